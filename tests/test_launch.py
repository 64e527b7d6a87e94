"""Multi-process launches (launch/, gdreg.main, gdreg.program.distributed) on loopback.

The end-to-end tests start ``python -m gdreg.main`` processes with 2 CPU devices each that
join through ``jax.distributed`` on 127.0.0.1, directly (``--coordinator_address``) or
through launch/slurm.sbatch with a fake ``srun``. Every subprocess runs in its own session
and is killed (with its children) when a test fails or runs out of time. The training run is
the ``quick`` config shrunk to seconds: synthetic 16x16 images, the one-layer ``convnet1``,
3 full-batch steps with the penalty and clipping on.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import two_processes

from gdreg.program import distributed, exitcodes, supervisor

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
CONFIG = f"{REPO / 'configs' / 'resnet18_fb.py'}:quick"
TINY = [
    "--config.data.name=synthetic",
    "--config.data.train_size=0",
    "--config.data.test_size=0",
    "--config.data.synthetic_train_size=256",
    "--config.data.synthetic_test_size=64",
    "--config.data.synthetic_shape=(16,16,3)",
    "--config.model.name=convnet1",
    "--config.model.width=4",
    "--config.train.epochs=3",
    "--config.train.block_size=32",
    "--config.eval.every_epochs=3",
    "--config.checkpoint.every_epochs=3",
    "--config.log.progress=False",
]
TIMING_KEYS = {"seconds", "images_per_second"}
RUN_TIMEOUT = 240  # seconds for one end-to-end run on 2 busy cores (a run takes ~15 s of CPU)


def _env(devices: int, **extra: str) -> dict[str, str]:
    """This environment without the test session's 8-device flag, with ``devices`` CPUs."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("SLURM_")}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
        PYTHON=sys.executable,
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


class Processes:
    """Subprocesses in their own sessions, logs in files; all killed on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed below; the child keeps its copy)
        proc = subprocess.Popen(
            args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def wait(self, timeout: float) -> dict[str, int]:
        """Exit codes by name; fails (after killing everything) when ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        for name, proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"{name} still running after {timeout:g} s\n{self.logs()}")
        return {name: proc.returncode for name, proc in self.procs}

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {name}:\n{self.log(name)[-tail:]}" for name, _ in self.procs)

    def kill(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                # The process group of a process we started (start_new_session): it and the
                # children it started, nothing else.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def processes(tmp_path):
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    procs = Processes(log_dir)
    yield procs
    procs.kill()


def _main(*args: str) -> list[str]:
    return [sys.executable, "-m", "gdreg.main", "--config", CONFIG, *TINY, *args]


def _process_flags(port: int, process_id: int, num_processes: int = 2) -> list[str]:
    return [
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={process_id}",
        "--initialization_timeout=120",
    ]


def _read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == [1, 2, 3]
    for mine, theirs in zip(got, want, strict=True):
        assert set(mine) == set(theirs)
        for key in sorted(set(mine) - TIMING_KEYS):
            np.testing.assert_allclose(
                mine[key], theirs[key], rtol=1e-4, atol=1e-6, err_msg=f"epoch {mine['epoch']} {key}"
            )
    assert "test_accuracy" in got[-1] and "grad_norm" in got[-1]


# What a finished run leaves in its workdir (process 0 writes all of it); the TensorBoard
# event file, whose name holds the time and host, is "events".
RUN_DIR_CONTENTS = [
    ".lock",
    "checkpoints",
    "config.json",
    "events",
    "loop_shape.json",
    "metrics.jsonl",
]


def _run_dir_contents(workdir: Path) -> list[str]:
    names = [p.name for p in workdir.iterdir()]
    return sorted("events" if name.startswith("events.out.tfevents.") else name for name in names)


def _assert_single_writer(workdir: Path) -> None:
    """One metrics file, one config, one event file, one checkpoint directory with exactly one
    committed step."""
    assert _run_dir_contents(workdir) == RUN_DIR_CONTENTS
    steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert steps == ["3"], steps
    files = [p for p in (workdir / "checkpoints").rglob("*")]
    assert not [p for p in files if "tmp" in p.name], files
    assert (workdir / "checkpoints" / "3" / "_CHECKPOINT_METADATA").is_file()


def _restore_params(workdir: Path) -> dict[str, np.ndarray]:
    """The parameters of the run's last checkpoint, restored as numpy arrays in this process."""
    import jax
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / "3" / "default"
    metadata = ocp.StandardCheckpointer().metadata(path).item_metadata
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    tree = ocp.PyTreeCheckpointer().restore(path, restore_args=args)
    leaves = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
    return {jax.tree_util.keystr(key): np.asarray(value) for key, value in leaves}


# ----- end to end ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_equal_one_process_with_four_devices(processes, tmp_path):
    """2 processes x 2 devices == 1 process x 4 devices (launch/single_node.sh), run side by side."""
    single, workdir = tmp_path / "single", tmp_path / "two"
    processes.start(
        "single",
        [str(LAUNCH / "single_node.sh"), "--config", CONFIG, *TINY, "--workdir", str(single)],
        _env(4),
    )
    port = two_processes.free_port()
    for i in range(2):
        processes.start(
            f"process{i}", _main("--workdir", str(workdir), *_process_flags(port, i)), _env(2)
        )
    codes = processes.wait(RUN_TIMEOUT)
    assert codes == {"single": 0, "process0": 0, "process1": 0}, processes.logs()
    assert "process 0 of 1" in processes.log("single")
    for i in range(2):
        log = processes.log(f"process{i}")
        assert f"process {i} of 2" in log and "4 devices in all" in log, log[-3000:]
    _assert_same_metrics(_read_metrics(workdir), _read_metrics(single))
    _assert_single_writer(workdir)
    _assert_single_writer(single)
    got, want = _restore_params(workdir), _restore_params(single)
    assert got.keys() == want.keys() and got
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)


FAKE_SRUN = r"""#!/usr/bin/env bash
# Fake srun: starts the tasks of one step on this machine with SLURM's per-task variables.
echo "$@" >> "$FAKE_SLURM_LOG"
ntasks="${SLURM_NTASKS:-1}"; per_node=1
while [[ "$1" == -* ]]; do
  case "$1" in
    --ntasks=*) ntasks="${1#*=}" ;;
    --ntasks-per-node=*) per_node="${1#*=}" ;;
  esac
  shift
done
if [[ -n "${FAKE_SRUN_EXIT:-}" ]]; then exit "$FAKE_SRUN_EXIT"; fi
pids=()
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) \
  SLURM_NTASKS=$ntasks SLURM_STEP_NUM_TASKS=$ntasks \
  SLURM_STEP_NUM_NODES=$(((ntasks + per_node - 1) / per_node)) \
  SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST" SLURM_STEP_ID=0 \
    "$@" > "$FAKE_SLURM_DIR/task$i.${SLURM_RESTART_COUNT:-0}.log" 2>&1 &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for pid in "${pids[@]}"; do
  while :; do  # a trapped signal interrupts `wait`: wait again while the task runs
    wait "$pid"; code=$?
    ((code > 128)) && kill -0 "$pid" 2>/dev/null || break
  done
  ((code > rc)) && rc=$code
done
exit "$rc"
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
"""


def _fake_slurm(tmp_path: Path, nodes: int, **extra: str) -> dict[str, str]:
    """A PATH with fake srun/scontrol and the variables sbatch sets for a job on ``nodes``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = _env(
        2,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_SLURM_LOG=str(tmp_path / "slurm_calls.log"),
        FAKE_SLURM_DIR=str(tmp_path),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_NNODES=str(nodes),
        SLURM_NTASKS=str(nodes),
        SLURM_PROCID="0",
        SLURM_CPUS_ON_NODE="2",
        SLURM_SUBMIT_DIR=str(REPO),
        JAX_COORDINATOR_PORT=str(two_processes.free_port()),
    )
    env.update(extra)
    return env


def test_slurm_script_parses():
    for script in ("slurm.sbatch", "single_node.sh", "paper_table.sh"):
        subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True, timeout=30)
    text = (LAUNCH / "slurm.sbatch").read_text()
    for directive in ("#SBATCH --requeue", "#SBATCH --signal=TERM@", "#SBATCH --ntasks-per-node=1"):
        assert directive in text


def _task_logs(tmp_path: Path, restart: int) -> list[str]:
    return [
        (tmp_path / f"task{i}.{restart}.log").read_text(errors="replace")
        if (tmp_path / f"task{i}.{restart}.log").exists()
        else ""
        for i in range(2)
    ]


@pytest.mark.slow
def test_slurm_job_is_preempted_requeued_and_resumes(processes, tmp_path):
    """Two (fake) nodes, one process each, joined through SLURM's variables.

    SIGTERM to the batch script (as on preemption) reaches both processes through srun; they
    stop after the same epoch with a checkpoint (exit 75) and the script requeues the job.
    The requeued job (SLURM_RESTART_COUNT=1) resumes from the workdir and finishes.
    """
    epochs = 150
    workdir = tmp_path / "run"
    env = _fake_slurm(tmp_path, nodes=2)
    script = ["bash", str(LAUNCH / "slurm.sbatch"), "--config", CONFIG, *TINY]
    script += [
        f"--config.train.epochs={epochs}",
        "--config.eval.every_epochs=0",
        "--config.checkpoint.every_epochs=0",
        "--workdir",
        str(workdir),
    ]
    job = processes.start("job", script, env)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + RUN_TIMEOUT
    while job.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text():
            job.send_signal(signal.SIGTERM)  # the batch shell only, as SLURM's preemption
            break
        time.sleep(0.1)
    codes = processes.wait(RUN_TIMEOUT)
    logs = processes.logs() + "\n".join(_task_logs(tmp_path, 0))
    assert codes == {"job": 75}, logs
    calls = (tmp_path / "slurm_calls.log").read_text().splitlines()
    assert calls == [
        f"--nodes=2 --ntasks=2 --ntasks-per-node=1 --wait=120 --cpus-per-task=2 {sys.executable} "
        f"-m gdreg.main {' '.join(script[2:])}",
        "scontrol requeue 4242",
    ]
    for i, log in enumerate(_task_logs(tmp_path, 0)):
        # one process per node: all its (2) devices, not only the one numbered SLURM_LOCALID
        assert f"process {i} of 2" in log and "4 devices in all" in log, log[-3000:]
        assert "preempted: stopped after epoch" in log, log[-3000:]
    stopped = len(_read_metrics(workdir))
    assert 1 <= stopped < epochs
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(stopped)]

    env["SLURM_RESTART_COUNT"] = "1"
    processes.start("requeued", script, env)
    codes = processes.wait(RUN_TIMEOUT)
    logs = processes.logs() + "\n".join(_task_logs(tmp_path, 1))
    assert codes == {"job": 75, "requeued": 0}, logs
    for log in _task_logs(tmp_path, 1):
        assert f"resuming from the checkpoint of epoch {stopped}" in log, log[-3000:]
    assert [r["epoch"] for r in _read_metrics(workdir)] == list(range(1, epochs + 1))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [stopped, epochs]
    assert _run_dir_contents(workdir) == RUN_DIR_CONTENTS


def test_slurm_script_requeues_after_checkpoint_stop(tmp_path):
    """Exit 75 (checkpointed on SIGTERM), 76 (a lost process) and 128 + N (a task killed by a
    signal) requeue the job, up to MAX_RESTARTS; other failures do not."""
    env = _fake_slurm(tmp_path, nodes=2, FAKE_SRUN_EXIT="75", PROCESS_PER="gpu", GPUS_PER_NODE="2")
    script = ["bash", str(LAUNCH / "slurm.sbatch"), "--workdir", "x"]
    log = tmp_path / "slurm_calls.log"
    result = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 75, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith(
        "--nodes=2 --ntasks=4 --ntasks-per-node=2 --wait=120 --cpus-per-task=1 "
    )
    assert calls[1] == "scontrol requeue 4242"
    for code, requeued in (("76", True), ("137", True), ("3", False)):
        log.unlink()
        env["FAKE_SRUN_EXIT"] = code
        result = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == int(code), result.stderr
        assert ("scontrol requeue 4242" in log.read_text().splitlines()) == requeued, code
    assert (
        "a process was lost"
        in subprocess.run(
            script, env={**env, "FAKE_SRUN_EXIT": "76"}, capture_output=True, text=True, timeout=60
        ).stdout
    )
    log.unlink()
    env["FAKE_SRUN_EXIT"] = "75"
    env["SLURM_RESTART_COUNT"] = env["MAX_RESTARTS"] = "3"
    result = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 75 and "resubmit" in result.stdout
    assert len(log.read_text().splitlines()) == 1  # no requeue
    for knob, value in (("PROCESS_PER", "socket"), ("TASK_WAIT", "soon")):
        result = subprocess.run(
            script, env={**env, knob: value}, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2 and knob in result.stderr


@pytest.mark.slow
def test_mismatched_configs_fail_fast_with_one_line(processes, tmp_path):
    port = two_processes.free_port()
    for i in range(2):
        epochs = [f"--config.train.epochs={3 + i}"]
        args = _main("--workdir", str(tmp_path / "run"), *_process_flags(port, i), *epochs)
        processes.start(f"process{i}", args, _env(2))
    assert processes.wait(120) == {"process0": 2, "process1": 2}, processes.logs()
    for i in range(2):
        errors = [line for line in processes.log(f"process{i}").splitlines() if "error" in line]
        assert len(errors) == 1, errors
        assert "process 1 got a config different from process 0's" in errors[0]
        assert "train.epochs: 3 vs 4" in errors[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_missing_process_times_out_with_one_line(processes, tmp_path):
    port = two_processes.free_port()
    args = _main("--workdir", str(tmp_path / "run"), *_process_flags(port, 0))
    args[-1] = "--initialization_timeout=3"
    proc = processes.start("process0", args, _env(2))
    codes = processes.wait(90)
    assert codes == {"process0": exitcodes.JOIN_TIMEOUT}, processes.logs()
    log = processes.log("process0")
    assert "error: process 0 of 2 (coordinator 127.0.0.1:" in log
    assert "not all processes joined within 3 s" in log
    assert "Check failure" not in log and "Traceback" not in log
    assert proc.returncode == exitcodes.JOIN_TIMEOUT


# ----- a lost or stopped process, a signal to one ----------------------------------------------

LONG_EPOCHS = 80
LONG = [
    f"--config.train.epochs={LONG_EPOCHS}",
    "--config.eval.every_epochs=0",
    "--config.checkpoint.every_epochs=5",
    "--heartbeat_timeout=10",  # JAX's runtime declares a silent process lost after 10 s
]
LOST_TIMEOUT = 90  # a survivor must be gone this long after its peer was lost


def _pair(processes: Processes, workdir: Path, name: str) -> list[subprocess.Popen]:
    """Processes 0 and 1 of a LONG_EPOCHS run on ``workdir``, logs ``NAME0``, ``NAME1``."""
    port = two_processes.free_port()
    return [
        processes.start(
            f"{name}{i}", _main(*LONG, "--workdir", str(workdir), *_process_flags(port, i)), _env(2)
        )
        for i in range(2)
    ]


def _exit_code(processes: Processes, proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        processes.kill()
        pytest.fail(f"pid {proc.pid} still running after {timeout:g} s\n{processes.logs()}")


def _epochs_written(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_for_epochs(processes: Processes, workdir: Path, count: int, pair) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while _epochs_written(workdir) < count:
        if any(proc.poll() is not None for proc in pair) or time.monotonic() > deadline:
            processes.kill()
            pytest.fail(f"no epoch {count} in {workdir}\n{processes.logs()}")
        time.sleep(0.05)


def _error_lines(processes: Processes, name: str) -> list[str]:
    log = processes.log(name)
    for noise in ("Check failure", "Traceback", "Fatal Python error", "client.h"):
        assert noise not in log, log[-3000:]
    return [line for line in log.splitlines() if line.startswith("error:")]


def _without_timing(workdir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in _read_metrics(workdir)]


@pytest.mark.slow
def test_a_signalled_lost_or_stopped_process_ends_every_process_and_the_run_resumes(
    processes, tmp_path
):
    """Two processes, one run interrupted three times, then finished; its metrics are those of
    the uninterrupted run exactly.

    1. SIGTERM to process 1 alone: both stop after the same epoch with its checkpoint (75).
    2. kill -9 of process 0 (the coordinator): process 1 exits 76 with one line naming it.
    3. SIGSTOP of process 1: process 0 exits 76 naming it after the heartbeat timeout; process 1,
       continued, finds the run gone and exits 76 too.
    """
    reference, workdir = tmp_path / "reference", tmp_path / "run"
    # the uninterrupted run, beside the first part (their processes wait on each other a lot)
    uninterrupted = _pair(processes, reference, "reference")

    # 1. SIGTERM to one process
    pair = _pair(processes, workdir, "term")
    _wait_for_epochs(processes, workdir, 1, pair)
    pair[1].send_signal(signal.SIGTERM)
    assert [_exit_code(processes, proc, RUN_TIMEOUT) for proc in pair] == [75, 75]
    assert [_exit_code(processes, proc, RUN_TIMEOUT) for proc in uninterrupted] == [0, 0]
    stopped = _epochs_written(workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(stopped)]
    for i in range(2):
        assert f"preempted: stopped after epoch {stopped};" in processes.log(f"term{i}")

    # 2. kill -9 of the coordinator
    pair = _pair(processes, workdir, "kill")
    _wait_for_epochs(processes, workdir, stopped + 8, pair)
    pair[0].kill()
    assert _exit_code(processes, pair[1], LOST_TIMEOUT) == exitcodes.LOST_PROCESS
    assert pair[0].wait(timeout=10) == -signal.SIGKILL
    errors = _error_lines(processes, "kill1")
    assert len(errors) == 1, processes.log("kill1")[-4000:]
    (error,) = errors
    assert error.startswith("error: lost process 0 of 2, the coordinator"), error
    assert "process 1 stops too" in error and "rerun every process" in error
    assert f"resuming from the checkpoint of epoch {stopped}" in processes.log("kill1")

    # 3. a stopped process
    pair = _pair(processes, workdir, "stop")
    before = _epochs_written(workdir)
    _wait_for_epochs(processes, workdir, before + 3, pair)
    pair[1].send_signal(signal.SIGSTOP)
    try:
        assert _exit_code(processes, pair[0], LOST_TIMEOUT) == exitcodes.LOST_PROCESS
    finally:
        pair[1].send_signal(signal.SIGCONT)
    (error,) = _error_lines(processes, "stop0")
    assert error.startswith("error: lost process 1 of 2: killed, crashed, stopped, or no "), error
    assert "heartbeat for 10 s" in error
    assert _exit_code(processes, pair[1], LOST_TIMEOUT) == exitcodes.LOST_PROCESS
    (error,) = _error_lines(processes, "stop1")
    assert "process 1 of 2 (this one) was declared lost" in error or "lost process 0" in error

    # 4. the rest of the run
    pair = _pair(processes, workdir, "final")
    assert [_exit_code(processes, proc, RUN_TIMEOUT) for proc in pair] == [0, 0]
    assert _without_timing(workdir) == _without_timing(reference)


# ----- launcher scripts without training -----------------------------------------------------


def _paper_table_dry_run(*args: str, **env: str) -> list[str]:
    """The commands ``paper_table.sh --dry-run ARGS`` prints, one per line."""
    result = subprocess.run(
        [str(LAUNCH / "paper_table.sh"), "--dry-run", *args],
        env=_env(1, **env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.splitlines()


def test_paper_table_submits_every_row_and_seed(tmp_path):
    from gdreg.program.config import PAPER_ROWS

    lines = _paper_table_dry_run(
        "--config.data.name=synthetic", SEEDS="2", RUNS_DIR=str(tmp_path / "runs")
    )
    assert len(lines) == 2 * len(PAPER_ROWS)
    for row in PAPER_ROWS:
        for seed in (0, 1):
            line = next(x for x in lines if f"/resnet18_fb/{row}/seed{seed} " in x)
            assert line.startswith(f"sbatch --job-name=gdreg-resnet18_fb-{row}-s{seed} ")
            assert f"configs/resnet18_fb.py:{row} " in line and f"--config.seed={seed} " in line
            assert line.rstrip().endswith("--config.data.name=synthetic")


def test_paper_table_takes_any_model_through_the_paper_config(tmp_path):
    (line,) = _paper_table_dry_run(MODEL="resnet50", ROWS="strong", RUNS_DIR=str(tmp_path / "r"))
    assert line.startswith("sbatch --job-name=gdreg-resnet50-strong-s0 ")
    assert "--config configs/paper.py:resnet50\\,strong " in line
    assert "/r/resnet50/strong/seed0 " in line


def test_paper_table_local_runs_sequentially(tmp_path):
    """--local runs every row through single_node.sh (a stub interpreter records the calls)."""
    stub = tmp_path / "python"
    calls = tmp_path / "calls"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n[[ "$*" != *:clipped* ]]\n')
    stub.chmod(stat.S_IRWXU)
    env = _env(1, ROWS="sgd clipped strong", SEEDS="3 7", RUNS_DIR="r", PYTHON=str(stub))
    result = subprocess.run(
        [str(LAUNCH / "paper_table.sh"), "--local", "--", "--config.train.epochs=1"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "failed runs: r/resnet18_fb/clipped/seed3" in result.stderr
    assert calls.read_text().splitlines() == [
        f"-m gdreg.main --config configs/resnet18_fb.py:{row} --workdir r/resnet18_fb/{row}/seed{seed}"
        f" --config.seed={seed} --config.train.epochs=1"
        for row in ("sgd", "clipped", "strong")
        for seed in (3, 7)
    ]


# ----- SLURM variables -> jax.distributed arguments ------------------------------------------


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node001", "node001"),
        ("node001,host2", "node001"),
        ("node[001-016],host2", "node001"),
        ("node[007,009-015]", "node007"),
        ("gpu[3-4]-ib,cpu1", "gpu3-ib"),
    ],
)
def test_first_hostname(nodelist, host):
    assert distributed.first_hostname(nodelist) == host


def _slurm(**overrides: str) -> dict[str, str]:
    env = {
        "SLURM_JOB_ID": "123457",
        "SLURM_STEP_NODELIST": "gpu[12-13]",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
        "SLURM_STEP_NUM_NODES": "2",
    }
    env.update(overrides)
    return env


def test_slurm_settings_one_process_per_node_uses_all_gpus():
    settings = distributed.slurm_settings(_slurm())
    assert settings == {
        "coordinator_address": f"gpu12:{123457 % 4096 + 61440}",
        "num_processes": 2,
        "process_id": 1,
        "local_device_ids": None,
    }
    assert distributed.launched_by_slurm(_slurm())
    assert not distributed.launched_by_slurm(_slurm(SLURM_NTASKS="1"))


def test_slurm_settings_one_process_per_gpu():
    env = _slurm(SLURM_NTASKS="8", SLURM_PROCID="6", SLURM_LOCALID="2")
    assert distributed.slurm_settings(env)["local_device_ids"] == [2]
    # SLURM bound one GPU to the task: use it, whatever its number.
    assert (
        distributed.slurm_settings({**env, "CUDA_VISIBLE_DEVICES": "2"})["local_device_ids"] is None
    )
    # an explicit choice wins (JAX reads JAX_LOCAL_DEVICE_IDS itself)
    assert (
        distributed.slurm_settings({**env, "JAX_LOCAL_DEVICE_IDS": "0,1"})["local_device_ids"]
        is None
    )
    assert (
        distributed.slurm_settings({**env, "JAX_COORDINATOR_PORT": "1234"})["coordinator_address"]
        == "gpu12:1234"
    )


# ----- the supervising parent's reading of flags and of JAX's fatal reports ----------------------

# What JAX's runtime (jaxlib 0.10) prints when it ends a process, abridged: the coordinator's
# view of a dead process 1, and a process whose coordinator is gone.
PEER_REPORT = """E1204 14:37:47.574945   26142 coordination_service.cc:1549] [4804] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error.
F1204 14:37:47.575542   26153 client.h:80] Terminating process because the JAX distributed service detected fatal errors. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed.
*** Check failure stack trace: ***
"""
COORDINATOR_REPORT = """F1204 14:38:02.655156   26345 client.h:80] Terminating process because the JAX distributed service detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues.
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/PollForError:
:UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:"Socket closed"}
"""


def test_the_supervisor_names_the_lost_process():
    assert supervisor.lost_processes(PEER_REPORT) == [1]
    assert supervisor.lost_processes(COORDINATOR_REPORT) == [0]
    assert supervisor.lost_processes("Task 3 heartbeat timeout") == [3]
    assert supervisor.lost_processes("something else") == []
    launch = supervisor.Launch(process_id=0, num_processes=4, heartbeat_timeout=60)
    line = supervisor.lost_process_message(PEER_REPORT, launch)
    assert line.startswith("error: lost process 1 of 4: killed, crashed, stopped, or no heartbeat")
    assert "\n" not in line and "process 0 stops too" in line
    mine = supervisor.lost_process_message(PEER_REPORT, launch._replace(process_id=1))
    assert mine.startswith("error: process 1 of 4 (this one) was declared lost")


def test_the_supervisor_reads_the_launch_like_distributed_initialize():
    launch = supervisor.multi_process_launch
    assert launch(["main", "--workdir", "w"], {}) is None
    assert launch(["main", "--num_processes=1"], {}) is None
    assert launch(
        ["main", "--num_processes", "2", "--process_id=1", "--heartbeat_timeout=7"], {}
    ) == (
        1,
        2,
        7,
    )
    assert launch(["main", "--coordinator_address=h:1"], {}) == (None, None, 60)
    slurm = _slurm(SLURM_PROCID="1")
    assert launch(["main"], slurm) == (1, 2, 60)
    assert launch(["main"], _slurm(SLURM_NTASKS="1")) is None
