"""SIGTERM, SIGINT and SIGHUP (SLURM preemption, Ctrl-C, a closed terminal): remembered, so the
run can stop cleanly.

``gdreg.main`` installs the handler first thing, before its other imports (so a signal a few
milliseconds after start is remembered too), and keeps it through distributed start-up, data
loading and compilation; the training loop asks :meth:`StopRequest.any_process` before the first
epoch and after every epoch, saves a checkpoint and exits with
:data:`gdreg.program.exitcodes.PREEMPTED`.

SIGHUP is what a process gets when its terminal or SSH session closes: it is a stop request
like SIGTERM, and the output that went to that terminal goes to ``/dev/null`` from then on
(writes to a hung-up terminal fail). A SIGHUP that was ignored at start (``nohup``) stays
ignored.

A second signal more than :data:`REPEAT_SECONDS` after the first stops at once (Ctrl-C twice);
one sooner is taken as the same request, since a SLURM preemption can deliver one SIGTERM
twice (to the job step, and again through ``srun`` from the batch script's trap). A request
forwarded by a supervising parent (:meth:`StopRequest.request`) never counts as the first
signal.

This module imports only the standard library at load time: it runs before everything else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

#: The signals that ask the run to stop after the current epoch.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: A repeated signal within this many seconds of the first is the same request.
REPEAT_SECONDS = 1.0


class StopRequest:
    """Remembers a SIGTERM/SIGINT/SIGHUP while installed (:meth:`install`, or as a context
    manager, which restores the previous handlers on exit)."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""
        self._signalled_at: float | None = None  # when the first signal was handled
        self._previous: dict[int, object] = {}
        self._terminal_fds: list[int] = []

    def install(self) -> StopRequest:
        """Catches the stop signals in this (main) thread from now on; returns itself."""
        self._terminal_fds = [fd for fd in (1, 2) if _isatty(fd)]
        for signum in STOP_SIGNALS:
            if signum in self._previous:
                continue
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # started under nohup: the user wants the run to outlive the terminal
            # Outside the main thread signals cannot be caught; leave them alone there.
            with contextlib.suppress(ValueError):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __enter__(self) -> StopRequest:
        return self.install()

    def _handle(self, signum, frame) -> None:
        del frame
        if signum == signal.SIGHUP:
            self.leave_terminal()
        now = time.monotonic()
        if self._signalled_at is not None:
            # Measured between handler runs: a handler runs when the main thread is back in
            # Python, so two signals during one long compiled step count as one.
            if now - self._signalled_at < REPEAT_SECONDS:
                return  # one request delivered twice (see the module docstring)
            # a second signal: the user means it (Ctrl-C twice)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._signalled_at = now
        self.request(f"received signal {signal.Signals(signum).name}")

    def request(self, reason: str) -> None:
        """Asks the run to stop after the current epoch (what a stop signal does; also called
        for a request forwarded by the supervising process, :mod:`gdreg.program.supervisor`,
        which never stops at once: only a second signal to this process does)."""
        if self.requested:
            return
        self.requested, self.reason = True, reason
        logging.warning(
            "%s: stopping at the end of this epoch with a checkpoint (a second signal: stop at "
            "once)",
            reason,
        )

    def installed(self) -> list[int]:
        """The signals this request catches now (SIGHUP not under ``nohup``)."""
        return list(self._previous)

    def leave_terminal(self) -> None:
        """After a hang-up, sends what went to the terminal to /dev/null: writing to a hung-up
        terminal fails (EIO), and a failed ``print`` would end the run before its checkpoint."""
        if not self._terminal_fds:
            return
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in self._terminal_fds:
            os.dup2(null, fd)
        os.close(null)
        self._terminal_fds = []

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def any_process(self) -> bool:
        """Whether any process got a signal (a collective call: every process must make it)."""
        import jax
        import numpy as np

        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags))


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False
