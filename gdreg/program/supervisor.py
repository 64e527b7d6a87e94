"""One process of a multi-process run, watched from a small parent: a lost peer in one line.

JAX's distributed runtime ends a process whose peer is gone with a C++ abort: when another
process stops sending heartbeats (killed, crashed, stopped, cut off), or at once when process 0,
which hosts the runtime's coordination service, goes away. Nothing in the process can catch
that (``LOG(FATAL)`` in a runtime thread; jaxlib's callback for it cannot call Python), and it
prints a C++ stack trace, exits by SIGABRT and leaves the SLURM script a status it cannot tell
from a crash.

So ``gdreg.main``, when started as one of several processes, runs the training in a child
process of its own and watches it (:func:`supervise`); this parent never imports JAX and
never parses the flags (the child does, and reports their errors). It passes the child's stdout through untouched and its stderr line by line; error lines
(``E``/``F`` in glog's format: the runtime's fatal report, the stack after it, errors it causes
in other threads) are held back for up to ten seconds, and if the child dies of the runtime's
verdict meanwhile, the parent prints one line naming the lost process instead and exits with
:data:`gdreg.program.exitcodes.LOST_PROCESS`, on which ``launch/slurm.sbatch`` requeues. The
last checkpoint is intact; the rerun resumes from it.

The pair behaves as one process to the outside:

* SIGTERM, SIGINT and SIGHUP to the parent become one stop request to the child (through a
  pipe, so a SIGTERM that SLURM also sends the child directly does not count twice; see
  :mod:`gdreg.program.preemption`);
* when the parent dies (``kill -9``), the child sees the pipe close and kills itself;
* when the parent is stopped (SIGSTOP), the child stops itself within half a second, and
  continues when the parent is continued;
* the parent exits with the child's status (a child killed by a signal: 128 + the signal, with
  one line saying so).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from gdreg.program import exitcodes

if TYPE_CHECKING:
    from gdreg.program.preemption import StopRequest

#: The environment variable that hands the child the read end of its parent's stop pipe.
PIPE_VARIABLE = "GDREG_SUPERVISOR_FD"
#: Seconds without a heartbeat after which JAX's runtime declares a process lost (flag
#: ``--heartbeat_timeout``); JAX's own default is 100.
DEFAULT_HEARTBEAT_TIMEOUT = 60
#: How long a held-back report of the runtime may wait for the child's end before it is shown
#: after all (the runtime logged an error and the process lived on).
HOLD_SECONDS = 10.0

# An error line in glog's format (JAX's C++ runtime, and absl's Python logging, which orbax's
# threads log through): ``E1204 14:37:47.574945   26142 file.cc:1549] ...``. When a peer is
# lost, the runtime's report and the errors it causes elsewhere (a checkpoint barrier, with its
# Python traceback) start so; each such burst is held back until the child ends or
# HOLD_SECONDS pass.
_ERROR_LINE = re.compile(rb"^[EF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]")
_FATAL = (
    "Terminating process because the JAX distributed service detected fatal errors",
    "Polled an error from coordination service",
    "heartbeat timeout",
)
_COORDINATOR_GONE = (
    "Failed to send RPC to coordination service",
    "leader task",
    "CoordinationService/Heartbeat",
    "CoordinationService/PollForError",
)


# ----- which launch ---------------------------------------------------------------------------


class Launch(NamedTuple):
    """This process's place in a multi-process launch (None where the flags leave it open)."""

    process_id: int | None
    num_processes: int | None
    heartbeat_timeout: float


def slurm_num_tasks(environ: Mapping[str, str]) -> int:
    return int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or "1")


def launched_by_slurm(environ: Mapping[str, str] | None = None) -> bool:
    """True inside ``srun`` with more than one task (SLURM_NTASKS > 1)."""
    environ = os.environ if environ is None else environ
    return slurm_num_tasks(environ) > 1 and "SLURM_PROCID" in environ


def _flag(argv: Sequence[str], name: str) -> str | None:
    """The last value of ``--name=V`` or ``--name V`` in ``argv`` (absl's forms), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def multi_process_launch(
    argv: Sequence[str], environ: Mapping[str, str] | None = None
) -> Launch | None:
    """The launch of ``gdreg.main ARGV`` if it is one of several processes, else None.

    Read from the flags (``--coordinator_address``, ``--num_processes``, ``--process_id``, any
    of them) or SLURM's variables, as :func:`gdreg.program.distributed.initialize` reads them;
    from ``argv`` itself, before absl parses it (the parent never does) and without JAX.
    """
    environ = os.environ if environ is None else environ
    names = ("coordinator_address", "num_processes", "process_id")
    values = {name: _flag(argv, name) for name in names}
    timeout = _int(_flag(argv, "heartbeat_timeout")) or DEFAULT_HEARTBEAT_TIMEOUT
    if any(value is not None for value in values.values()):
        count = _int(values["num_processes"])
        alone = values["coordinator_address"] is None and values["process_id"] is None
        if alone and (count is None or count <= 1):  # --num_processes=1 only
            return None
        return Launch(_int(values["process_id"]), count, timeout)
    if launched_by_slurm(environ):
        return Launch(_int(environ.get("SLURM_PROCID")), slurm_num_tasks(environ), timeout)
    return None


# ----- the parent -----------------------------------------------------------------------------


def lost_processes(report: str) -> list[int]:
    """The processes a fatal report of JAX's runtime names as lost ([0] when the coordinator,
    process 0, cannot be reached; [] when it names none)."""
    match = re.search(
        r"unhealthy \(stopped sending heartbeats\):\s*\n(.*?)\n\s*The tasks", report, re.S
    )
    if match:
        found = [int(n) for n in re.findall(r"(\d+)\s*$", match.group(1), re.M)]
        if found:
            return sorted(set(found))
    found = [int(n) for n in re.findall(r"Task (\d+) heartbeat timeout", report)]
    if found:
        return sorted(set(found))
    if any(marker in report for marker in _COORDINATOR_GONE):
        return [0]
    return []


def lost_process_message(report: str, launch: Launch) -> str:
    """The one line for a child ended by JAX's runtime because a process was lost."""
    lost = lost_processes(report)
    total = f" of {launch.num_processes}" if launch.num_processes else ""
    me = launch.process_id
    silent = f"no heartbeat for {launch.heartbeat_timeout:g} s (--heartbeat_timeout)"
    rerun = "rerun every process with the same --workdir to resume from the last checkpoint"
    if me is not None and lost == [me]:
        return (
            f"error: process {me}{total} (this one) was declared lost by the run: stopped or cut "
            f"off, {silent}; every process has stopped without a new checkpoint: {rerun}"
        )
    if lost == [0]:
        who = f"lost process 0{total}, the coordinator (its coordination service is gone)"
    elif lost:
        names = ", ".join(map(str, lost))
        who = f"lost process{'es' if len(lost) > 1 else ''} {names}{total}"
    else:
        who = "lost another process of the run"
    this = f"process {me}" if me is not None else "this process"
    return (
        f"error: {who}: killed, crashed, stopped, or {silent}; see that process's log; {this} "
        f"stops too, without a new checkpoint: {rerun}"
    )


class _Relay:
    """Copies the child's stderr to ours line by line, holding back the runtime's fatal report."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.partial = b""
        self.held: list[bytes] | None = None
        self.held_since = 0.0

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a hung-up terminal: nowhere to show it
            os.write(2, data)

    def _line(self, line: bytes) -> None:
        if self.held is None and _ERROR_LINE.match(line):
            self.held, self.held_since = [], time.monotonic()
        if self.held is not None:
            self.held.append(line)
        else:
            self._write(line)

    def release(self) -> None:
        """Shows what was held back (the child lived on, or ended for another reason)."""
        if self.held:
            self._write(b"".join(self.held))
        self.held = None

    def report(self) -> str:
        return b"".join(self.held or []).decode(errors="replace")

    def pump(self, child: subprocess.Popen) -> None:
        """Relays until the child's stderr closes."""
        while True:
            try:
                ready, _, _ = select.select([self.fd], [], [], 1.0)
            except InterruptedError:
                continue
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                lines = (self.partial + chunk).split(b"\n")
                self.partial = lines.pop()
                for line in lines:
                    self._line(line + b"\n")
            if (
                self.held is not None
                and time.monotonic() - self.held_since > HOLD_SECONDS
                and child.poll() is None
            ):
                self.release()
        if self.partial:
            self._line(self.partial)
            self.partial = b""


def supervise(argv: Sequence[str], stop: StopRequest, launch: Launch) -> int:
    """Runs ``python -m gdreg.main ARGV[1:]`` as a child and returns the exit status to exit with
    (see the module docstring). ``stop``: this process's stop request, installed at start; a
    signal it already caught is passed on to the child."""
    read_end, write_end = os.pipe()
    pipe = [write_end]  # emptied once closed: a late signal must not write to a reused fd

    def forward(signum, frame) -> None:
        del frame
        if signum == signal.SIGHUP:
            stop.leave_terminal()
        with contextlib.suppress(OSError):  # the child is gone
            for fd in pipe:
                os.write(fd, bytes([signum]))

    for signum in stop.installed():
        signal.signal(signum, forward)
    if stop.requested:
        forward(signal.SIGTERM, None)
    env = {**os.environ, PIPE_VARIABLE: str(read_end)}
    child = subprocess.Popen(
        [sys.executable, "-m", "gdreg.main", *argv[1:]],
        env=env,
        stderr=subprocess.PIPE,
        pass_fds=(read_end,),
    )
    os.close(read_end)
    # A stopped parent stops its child (see _follow_stops); continued, it continues it.
    signal.signal(signal.SIGCONT, lambda signum, frame: _signal(child, signal.SIGCONT))
    relay = _Relay(child.stderr.fileno())
    relay.pump(child)
    code = child.wait()
    pipe.clear()
    os.close(write_end)
    if code >= 0:
        relay.release()
        return code
    signum = -code
    report = relay.report()
    if any(marker in report for marker in _FATAL):
        relay.held = None
        _say(lost_process_message(report, launch))
        return exitcodes.LOST_PROCESS
    relay.release()
    if signum in stop.installed():
        # stopped at once by a repeated stop signal (Ctrl-C twice): end the same way, quietly
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    name = signal.Signals(signum).name
    hint = " (out of memory, or killed by hand)" if signum == signal.SIGKILL else ""
    _say(
        f"error: the training process was killed by {name}{hint}; rerun with the same "
        "--workdir to resume from the last checkpoint"
    )
    return 128 + signum


def _signal(child: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(OSError):
        child.send_signal(signum)


def _say(line: str) -> None:
    with contextlib.suppress(OSError):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


# ----- the child ------------------------------------------------------------------------------


def attach(stop: StopRequest) -> bool:
    """In the child of :func:`supervise`: takes stop requests from the parent, dies with it and
    stops with it. Returns whether this process is such a child."""
    fd = os.environ.pop(PIPE_VARIABLE, None)
    if fd is None:
        return False
    parent = os.getppid()
    threading.Thread(
        target=_listen, args=(int(fd), stop), name="supervisor-pipe", daemon=True
    ).start()
    if os.path.exists(f"/proc/{parent}/stat"):
        threading.Thread(
            target=_follow_stops, args=(parent,), name="supervisor-stopped", daemon=True
        ).start()
    return True


def _listen(fd: int, stop: StopRequest) -> None:
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if not data:
            # The parent is gone (kill -9): to the outside it was this process; go with it.
            os.kill(os.getpid(), signal.SIGKILL)
            return
        name = signal.Signals(data[-1]).name
        stop.request(f"received signal {name}")


def _follow_stops(parent: int) -> None:
    """Stops this process while its parent is stopped (SIGSTOP or a terminal's Ctrl-Z to the
    parent alone), so that the pair looks stopped to the other processes of the run too."""
    path = f"/proc/{parent}/stat"
    while True:
        time.sleep(0.5)
        try:
            with open(path) as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("T", "t"):
            os.kill(os.getpid(), signal.SIGSTOP)
