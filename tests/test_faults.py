"""Faults injected into real command-line runs: kills, damaged files, two runs, early SIGTERM.

Every run here is ``python -m gdreg.main`` on a tiny CNN and 8x8 synthetic images, 6 epochs with
a checkpoint every 2. Each fault must end either in a run that finishes with exactly the metrics
of the uninterrupted run, or in the documented one-line error with exit status 2 and nothing
changed on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_train import REPO, TINY_FLAGS, main_command, run_main, strip_timing

from gdreg.program import rundir

EPOCHS = 6
ARGS = (
    *TINY_FLAGS,
    "--config.data.name=synthetic",
    f"--config.train.epochs={EPOCHS}",
    "--config.checkpoint.every_epochs=2",
    "--config.checkpoint.keep=5",
    "--config.eval.every_epochs=2",
)


def metrics(workdir) -> list[dict]:
    return strip_timing(rundir.read_metrics(workdir))


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The uninterrupted run (checkpoints 2, 4 and 6)."""
    workdir = tmp_path_factory.mktemp("faults") / "whole"
    result = run_main(main_command(workdir, *ARGS))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def finish(workdir, *extra) -> subprocess.CompletedProcess:
    result = run_main(main_command(workdir, *ARGS, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def start(workdir, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        main_command(workdir, *ARGS, *extra),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, process, what, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


def lines_written(workdir) -> int:
    path = Path(workdir) / rundir.METRICS_FILE
    return len(path.read_text().splitlines()) if path.exists() else 0


def snapshot(workdir) -> dict[str, str]:
    """Every file below ``workdir`` with a hash of its content."""
    return {
        str(path.relative_to(workdir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(Path(workdir).rglob("*"))
        if path.is_file()
    }


# ----- kill -9 ------------------------------------------------------------------------------


def _checkpoint_being_written(workdir) -> bool:
    folder = Path(workdir) / rundir.CHECKPOINT_DIR
    return folder.exists() and any("tmp" in path.name for path in folder.iterdir())


@pytest.mark.parametrize("moment", ["before_first_checkpoint", "writing_checkpoint", "after"])
def test_kill_9_then_a_rerun_finishes_the_same_run(whole, tmp_path, moment):
    workdir = tmp_path / moment
    process = start(workdir)
    if moment == "before_first_checkpoint":
        wait_for(lambda: lines_written(workdir) >= 1, process, "first epoch")
    elif moment == "writing_checkpoint":
        # Orbax writes a step into a temporary folder and renames it when it is complete; kill
        # while that folder exists (or, if the write is too quick to see, just after epoch 4).
        wait_for(
            lambda: _checkpoint_being_written(workdir) or lines_written(workdir) >= 4,
            process,
            "a checkpoint write",
        )
    else:
        wait_for(lambda: lines_written(workdir) >= 3, process, "epoch 3")
    process.kill()
    process.communicate(timeout=60)
    finish(workdir)
    assert metrics(workdir) == metrics(whole)


# ----- damaged checkpoints ------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero(path: Path) -> None:
    path.write_bytes(b"\0" * max(path.stat().st_size, 16))


CHECKPOINT_FILES = sorted(
    # the files orbax writes for one step (OCDBT format), relative to the step folder
    [
        "_CHECKPOINT_METADATA",
        "default/_METADATA",
        "default/_sharding",
        "default/manifest.ocdbt",
        "default/array_metadatas/process_0",
        "default/ocdbt.process_0/manifest.ocdbt",
        "default/ocdbt.process_0/d",
        "default/d",
    ]
)


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_damaging_any_checkpoint_file_loses_nothing(whole, tmp_path, name, damage):
    """Each file of the newest checkpoint, damaged in turn: the rerun ends like the whole run.

    Either the damaged checkpoint still reads (the file is metadata orbax can do without) or it
    is passed over with one warning, moved aside, and the run resumes from the one before.
    """
    workdir = tmp_path / "run"
    shutil.copytree(whole, workdir)
    target = workdir / "checkpoints" / "6" / name
    files = [path for path in target.rglob("*") if path.is_file()] if target.is_dir() else [target]
    assert files, f"orbax no longer writes {name}"
    for path in files:
        (_truncate if damage == "truncated" else _zero)(path)
    result = finish(workdir)
    if "checkpoint 6 cannot be read" in result.stderr:
        assert "resuming from the checkpoint of epoch 4" in result.stderr
        assert sorted(os.listdir(workdir / rundir.DAMAGED_CHECKPOINT_DIR)) == ["6"]
    else:
        assert "resuming from the checkpoint of epoch 6" in result.stderr
    assert metrics(workdir) == metrics(whole)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]


def test_a_stray_empty_step_folder_is_passed_over(whole, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(whole, workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    (workdir / "checkpoints" / "8").mkdir()
    finish(workdir)
    assert metrics(workdir) == metrics(whole)


def test_no_readable_checkpoint_is_an_error_unless_a_restart_is_asked_for(whole, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(whole, workdir)
    for step in ("2", "4", "6"):
        _zero(workdir / "checkpoints" / step / "default" / "_METADATA")
    result = run_main(main_command(workdir, *ARGS))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--config.checkpoint.restart_if_damaged=True" in errors[0]
    assert "Traceback" not in result.stderr
    finish(workdir, "--config.checkpoint.restart_if_damaged=True")
    assert metrics(workdir) == metrics(whole)


# ----- the metrics file, two runs, config changes ---------------------------------------------


def test_a_torn_last_metrics_line_is_dropped(whole, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(whole, workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    with open(workdir / rundir.METRICS_FILE, "a") as handle:
        handle.write('{"epoch": 7, "train_lo')  # what a kill in the middle of a write leaves
    finish(workdir)
    assert metrics(workdir) == metrics(whole)


def test_a_second_run_on_the_same_workdir_is_refused(tmp_path):
    workdir = tmp_path / "run"
    first = start(workdir, "--config.train.epochs=100000")
    try:
        wait_for(lambda: lines_written(workdir) >= 1, first, "first epoch")
        second = run_main(main_command(workdir, *ARGS, "--config.train.epochs=100000"))
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"pid {first.pid}" in errors[0], second.stderr[-3000:]
        assert "is in use by host" in errors[0]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 75
    # The refused run wrote nothing: the first one's epochs are there once each.
    epochs = [record["epoch"] for record in rundir.read_metrics(workdir)]
    assert epochs == list(range(1, len(epochs) + 1))


def test_resuming_with_another_config(whole, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(whole, workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    before = snapshot(workdir)
    for flag, expected in [
        ("--config.model.width=8", "cannot resume with another model.width"),
        ("--config.optim.momentum=0.0", "cannot resume with another optim.momentum"),
        ("--config.optim.lr=0.4", "optim.lr 0.8 -> 0.4); pass --allow_config_change"),
    ]:
        result = run_main(main_command(workdir, *ARGS, flag))
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
        assert snapshot(workdir) == before, flag
    # Runtime knobs may change freely; with the flag, so may the rest, and it is recorded.
    finish(
        workdir, "--config.train.cpu_devices=1", "--config.optim.lr=0.4", "--allow_config_change"
    )
    (change,) = [line for line in (workdir / rundir.CONFIG_HISTORY_FILE).read_text().splitlines()]
    assert '"optim.lr": {"from": 0.8, "to": 0.4}' in change and "cpu_devices" not in change
    assert rundir.read_config(str(workdir)).optim.lr == 0.4


# ----- SIGTERM during start-up and compilation ---------------------------------------------------


@pytest.mark.parametrize(
    ("marker", "stopped"),
    [
        ("process 0 of 1", "stopped during start-up, before epoch 1"),  # data still to load
        ("training of convnet2", "stopped after epoch 1"),  # the first epoch still to compile
    ],
)
def test_sigterm_during_start_up_exits_75_and_a_rerun_finishes(whole, tmp_path, marker, stopped):
    workdir = tmp_path / "run"
    process = start(workdir)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            process.send_signal(signal.SIGTERM)
            break
    _, rest = process.communicate(timeout=240)
    log = "".join(seen) + rest
    assert process.returncode == 75, log[-3000:]
    assert stopped in log, log[-3000:]
    finish(workdir)
    assert metrics(workdir) == metrics(whole)


# ----- every bad input: one line, exit 2, nothing written -----------------------------------------


def _npz(tmp_path, **changes) -> str:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8),
        "y_train": np.arange(64) % 4,
        "x_test": rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
        "y_test": np.arange(16) % 4,
    }
    path = tmp_path / "data.npz"
    np.savez(path, **{**arrays, **changes})
    return f"--config.data.npz_path={path}"


BAD_INPUT = {
    "unknown field": (["--config.foo=1"], "--config.foo: no such config field"),
    "misspelt field": (["--config.optim.lrr=0.1"], 'did you mean "lr"'),
    "wrong type": (["--config.train.epochs=abc"], "--config.train.epochs=abc"),
    "unknown variant": (["--config=configs/resnet18_fb.py:quik"], "unknown variant 'quik'"),
    "augmentation": (["--config.data.augmentation=sometimes"], "data.augmentation='sometimes'"),
    "copies": (["--config.data.copies=0"], "data.copies must be >= 1"),
    "padding": (["--config.data.padding=-2"], "data.padding must be >= 0"),
    "eval batch": (["--config.eval.batch_size=0"], "eval.batch_size must be at least 1"),
    "width": (["--config.model.width=0"], "model.width must be a positive number"),
    "model": (["--config.model.name=resnet7"], "model.name: unknown model 'resnet7'"),
    "dataset": (["--config.data.name=imagenet21k"], "data.name='imagenet21k'"),
    "learning rate": (["--config.optim.lr=-0.1"], "optim.lr must be positive"),
    "block size": (["--config.train.block_size=4096"], "train.block_size 4096 is larger"),
    "unexpected argument": (["extra"], "unexpected arguments: extra"),
}
NPZ_INPUT = {
    "npz missing": ({}, "file not found"),
    "npz channels-first": ({"x_train": np.zeros((64, 3, 8, 8), np.uint8)}, "channels-first"),
    "npz unknown test class": ({"y_test": np.full(16, 50)}, "y_test has labels that y_train"),
    "npz empty test split": (
        {"x_test": np.zeros((0, 8, 8, 3), np.uint8), "y_test": np.zeros(0, int)},
        "the test split is empty",
    ),
    "npz NaN pixels": ({"x_train": np.full((64, 8, 8, 3), np.nan)}, "NaN or infinite pixels"),
}


def _assert_refused(result, expected):
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, case):
    flags, expected = BAD_INPUT[case]
    workdir = tmp_path / "run"
    if flags[0].startswith("--config="):  # another config file argument
        command = main_command(workdir, *ARGS, config=flags[0].split("=", 1)[1])
    else:
        command = main_command(workdir, *ARGS, *flags)
    _assert_refused(run_main(command), expected)
    assert not workdir.exists()


@pytest.mark.parametrize("case", sorted(NPZ_INPUT))
def test_bad_npz_is_one_error_line_and_writes_nothing(tmp_path, case):
    changes, expected = NPZ_INPUT[case]
    flag = _npz(tmp_path, **changes)
    if case == "npz missing":
        flag = f"--config.data.npz_path={tmp_path / 'missing.npz'}"
    workdir = tmp_path / "run"
    command = main_command(workdir, *ARGS, "--config.data.name=npz", flag)
    _assert_refused(run_main(command), expected)
    assert not workdir.exists()


def test_bad_input_leaves_an_existing_run_unchanged(whole, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(whole, workdir)
    before = snapshot(workdir)
    _assert_refused(run_main(main_command(workdir, *ARGS, "--config.data.copies=0")), "data.copies")
    assert snapshot(workdir) == before


def test_the_console_says_how_many_images_are_left_out(tmp_path):
    result = run_main(
        main_command(
            tmp_path / "run",
            *ARGS,
            "--config.data.synthetic_train_size=100",
            "--config.train.epochs=1",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 of 100 training images (4.0%) are left out of every epoch" in result.stderr
    assert "whole block of 32 (always the same images: the last ones)" in result.stderr


# ----- workdir names, overrides, loop shapes, device counts (issue 29) -------------------------


def _resume_from_4(whole, workdir) -> Path:
    """``whole`` copied to ``workdir`` without its last checkpoint: a rerun trains epochs 5-6."""
    shutil.copytree(whole, workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    return workdir


def test_a_workdir_with_brackets_resumes(whole, tmp_path):
    """Orbax globbed inside ``runs/lr[0.1]`` with the brackets as a pattern: its checkpoints were
    written but never read back. Now checkpoint 6 is written there and read back."""
    workdir = _resume_from_4(whole, tmp_path / "lr[0.1]")
    result = finish(workdir)
    assert "resuming from the checkpoint of epoch 4" in result.stderr, result.stderr[-3000:]
    assert metrics(workdir) == metrics(whole)
    again = finish(workdir)
    assert "resuming from the checkpoint of epoch 6" in again.stderr, again.stderr[-3000:]
    assert "cannot be read" not in again.stderr
    assert metrics(workdir) == metrics(whole)


def test_a_workdir_with_a_backslash_is_refused_before_anything_is_written(tmp_path):
    # tensorstore reads a backslash as a directory separator: the files would land in a/b/.
    workdir = tmp_path / "a\\b"
    _assert_refused(run_main(main_command(workdir, *ARGS)), "contains a backslash")
    assert sorted(os.listdir(tmp_path)) == []


def test_tuple_overrides_take_the_last_and_blocks_per_microbatch_is_cut_to_the_blocks(
    whole, tmp_path
):
    """Two command-line slips in one run: a tuple field given twice keeps the last value (it
    used to concatenate), and 1000 blocks per microbatch for 4 blocks on 8 devices is cut to the
    one block each device has (it used to compile for minutes). The run is the whole run."""
    workdir = tmp_path / "run"
    result = finish(
        workdir,
        "--config.optim.milestones=(30,60)",
        "--config.optim.milestones=(5,)",  # unused by the quick config's cosine schedule
        "--config.train.blocks_per_microbatch=1000",
    )
    assert rundir.read_config(str(workdir)).optim.milestones == (5,)
    assert (
        "train.blocks_per_microbatch=1000 is more than the 1 block each device has per epoch; "
        "using 1" in result.stderr
    ), result.stderr[-3000:]
    assert rundir.read_loop_shape(str(workdir))["blocks_per_microbatch"] == 1
    assert metrics(workdir) == metrics(whole)


def test_a_stored_loop_shape_beyond_the_blocks_is_cut(whole, tmp_path):
    workdir = _resume_from_4(whole, tmp_path / "run")
    path = Path(rundir.loop_shape_path(str(workdir)))
    path.write_text(
        path.read_text().replace('"blocks_per_microbatch": 1', '"blocks_per_microbatch": 1000')
    )
    result = finish(workdir)
    assert "blocks_per_microbatch=1000 is more than the 1 block each device" in result.stderr
    assert rundir.read_loop_shape(str(workdir))["blocks_per_microbatch"] == 1
    assert metrics(workdir) == metrics(whole)


def test_resuming_on_another_device_count_says_the_sums_change_order(whole, tmp_path):
    workdir = _resume_from_4(whole, tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the whole run had 8
    result = run_main(main_command(workdir, *ARGS, "--config.train.cpu_devices=4"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "change order" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "resuming on 4 devices in 1 process after training on 8 in 1 process" in lines[0]
    assert rundir.read_loop_shape(str(workdir))["devices"] == 4
    got, want = metrics(workdir), metrics(whole)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for mine, theirs in zip(got, want, strict=True):
        for key, value in theirs.items():
            np.testing.assert_allclose(mine[key], value, rtol=1e-5, atol=1e-7, err_msg=key)


# ----- signals: a closed terminal, a SIGTERM at once ---------------------------------------------


def test_sighup_from_a_closed_terminal_checkpoints_and_exits_75(whole, tmp_path):
    """The run's terminal closes (SIGHUP, then every write to it fails): the epoch finishes, a
    checkpoint is saved, exit 75; the rerun ends like the whole run."""
    import pty
    import threading

    workdir = tmp_path / "run"
    master, terminal = pty.openpty()
    process = subprocess.Popen(
        main_command(workdir, *ARGS), cwd=REPO, stdout=terminal, stderr=terminal
    )
    os.close(terminal)

    def drain():  # a terminal shows what it gets; until it is closed
        with contextlib.suppress(OSError):
            while os.read(master, 65536):
                pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        wait_for(lambda: lines_written(workdir) >= 1, process, "first epoch")
        process.send_signal(signal.SIGHUP)
        os.close(master)  # the terminal is gone: writes to it fail from now on
        process.wait(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 75
    assert 1 <= lines_written(workdir) < EPOCHS
    finish(workdir)
    assert metrics(workdir) == metrics(whole)


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` now (Linux: SigCgt in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signum - 1) & 1)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_sigterm_right_after_start_exits_75_and_writes_nothing(tmp_path):
    """The handler is the first thing gdreg.main installs, before absl, numpy and JAX load; a
    SIGTERM from then on (here: the moment it is in place) ends the run with 75, not -15."""
    workdir = tmp_path / "run"
    process = start(workdir)
    deadline = time.monotonic() + 60
    while not _catches(process.pid, signal.SIGTERM):
        assert process.poll() is None and time.monotonic() < deadline, "no SIGTERM handler"
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    assert "preempted: stopped during start-up, before anything was written" in stderr
    assert not workdir.exists()


def test_a_repeated_signal_stops_at_once_only_after_a_second():
    """One SIGTERM delivered twice (SLURM: to the step and through srun) and a request forwarded
    by the supervising parent are one request; a signal more than a second after the first
    stops at once."""
    script = """
import os, signal, sys, time
from gdreg.program import preemption
stop = preemption.StopRequest().install()
stop.request("forwarded by the parent")
time.sleep(1.2)
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)
print("still running", stop.requested, flush=True)
time.sleep(1.2)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("not stopped")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.stdout == "still running True\n", result.stderr[-3000:]
    assert result.returncode == -signal.SIGTERM
