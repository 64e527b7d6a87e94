"""Faults injected into real command-line runs: kills, damaged files, two runs, early SIGTERM,
full disks, unwritable or damaged run directories, bad input.

Every run here is ``python -m gdreg.main`` on a tiny CNN and 8x8 synthetic images, 6 epochs with
a checkpoint every 2. Each fault must end either in a run that finishes with exactly the metrics
of the uninterrupted run, or in the documented one-line error with exit status 2 and nothing
changed on disk (or, for a full disk, nothing lost: a rerun with room finishes the same run).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
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


def _npz(tmp_path, declared=None, **changes) -> str:
    """An npz dataset with ``changes``; ``declared={key: (shape, dtype)}`` writes those arrays'
    headers by hand, over the data of the unchanged array (what a damaged or forged file
    declares)."""
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8),
        "y_train": np.arange(64) % 4,
        "x_test": rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
        "y_test": np.arange(16) % 4,
    }
    arrays.update(changes)
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            if key in (declared or {}):
                shape, dtype = declared[key]
                header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(buffer, header)
                buffer.write(np.ascontiguousarray(array).tobytes())
            else:
                np.save(buffer, array)
            archive.writestr(f"{key}.npy", buffer.getvalue())
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
    "learning rate": (["--config.optim.lr=-0.1"], "optim.lr must be finite and positive"),
    "block size": (["--config.train.block_size=4096"], "train.block_size 4096 is larger"),
    "unexpected argument": (["extra"], "unexpected arguments: extra"),
    # infinite numbers used to train (and then "diverge"), or to sleep in a far timing budget
    "infinite lr": (["--config.optim.lr=inf"], "optim.lr must be finite and positive, got inf"),
    "infinite decay": (
        ["--config.optim.weight_decay=inf"],
        "optim.weight_decay must be finite and >= 0, got inf",
    ),
    "infinite field": (
        ["--config.train.autotune_seconds=inf"],
        "train.autotune_seconds must be a finite number, got inf",
    ),
    # float8 and float4 train without learning; float64 without x64 ran as float32
    "float8": (["--config.model.dtype=float8_e4m3fn"], "model.dtype must be one of"),
    "float4": (["--config.model.dtype=float4_e2m1fn"], "model.dtype must be one of"),
    "float64 without x64": (["--config.model.dtype=float64"], "needs JAX's 64-bit mode"),
    # an OverflowError traceback; a negative seed was blamed on the data section
    "seed 2**64": (["--config.seed=18446744073709551616"], "error: seed must be in 0..4294967294"),
    "negative seed": (["--config.seed=-1"], "error: seed must be in 0..4294967294"),
    "epochs": (["--config.train.epochs=2000000"], "train.epochs must be in 1..1000000"),
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
    # a typo'd label built a 10**8-way output layer (killed for memory); 2**31 wrapped to a
    # negative class (then "diverged"); 2**32 + 1 wrapped to class 1 and trained
    "npz label 10**8": (
        {"y_train": np.where(np.arange(64) == 17, 10**8, np.arange(64) % 4)},
        "y_train[17] = 100000000, so the model would have 100000001 classes",
    ),
    "npz label 2**31": (
        {"y_train": np.where(np.arange(64) == 5, 2**31, np.arange(64) % 4)},
        "y_train[5] = 2147483648 is beyond int32",
    ),
    "npz label 2**32+1": (
        {"y_train": np.where(np.arange(64) == 9, 2**32 + 1, np.arange(64) % 4)},
        "y_train[9] = 4294967297 is beyond int32",
    ),
    "npz test label 10**8": (
        {"y_test": np.where(np.arange(16) == 3, 10**8, np.arange(16) % 4)},
        "the first y_test[3] = 100000000",
    ),
    # ids 1000..1003 built a 1004-way output layer
    "npz label ids from 1000": (
        {"y_train": np.arange(64) % 4 + 1000, "y_test": np.arange(16) % 4 + 1000},
        "would have 1004 classes (0..1003), but only 4 of them occur in y_train",
    ),
    # numpy's ArrayMemoryError traceback
    "npz declared images": (
        {"declared": {"x_train": ((10**9, 32, 32, 3), np.uint8)}},
        "x_train declares shape (1000000000, 32, 32, 3) uint8 (2.79 TiB), but its archive "
        "member holds",
    ),
    "npz declared labels": (
        {"declared": {"y_train": ((2**40,), np.int64)}},
        "y_train declares shape (1099511627776,) int64 (8 TiB)",
    ),
    # floats divided by 255 twice became 1-bit images
    "npz images / 255 twice": (
        {"x_train": np.random.default_rng(0).uniform(0, 1, (64, 8, 8, 3)) / 255},
        "divided by 255 twice?",
    ),
    # docs/options.md promises 1, 3 or 4 channels
    "npz 2 channels": (
        {"x_train": np.zeros((64, 8, 8, 2), np.uint8), "x_test": np.zeros((16, 8, 8, 2), np.uint8)},
        "has 2 channels; images have 1 (grayscale), 3 (RGB) or 4 (RGBA) channels",
    ),
    "npz 7 channels": (
        {"x_train": np.zeros((64, 8, 8, 7), np.uint8), "x_test": np.zeros((16, 8, 8, 7), np.uint8)},
        "has 7 channels",
    ),
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


# ----- the run directory: where it cannot be, what it must hold ----------------------------------


def _errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_a_workdir_that_cannot_be_a_directory_is_one_error_line(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory\n")
    workdir = blocker if where == "a file" else blocker / "run"
    expected = "is a file, not a directory" if where == "a file" else f"{blocker} is a file"
    _assert_refused(run_main(main_command(workdir, *ARGS)), expected)
    assert blocker.read_text() == "not a directory\n"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("optim.lr", "0.8", "optim.lr is '0.8', and the field holds a float"),
        ("model.name", 3, "model.name is 3, and the field holds a str"),
        ("train.epochs", 6.0, "train.epochs is 6.0, and the field holds a int"),
    ],
)
def test_a_config_json_of_wrong_types_is_one_error_line(whole, tmp_path, field, value, expected):
    """config.json edited by hand (or by another program): a field of another type than the
    schema's used to end in ml_collections' TypeError traceback."""
    workdir = tmp_path / "run"
    shutil.copytree(whole, workdir)
    path = workdir / rundir.CONFIG_FILE
    values = json.loads(path.read_text())
    section, name = field.split(".")
    values[section][name] = value
    path.write_text(json.dumps(values))
    before = snapshot(workdir)
    _assert_refused(run_main(main_command(workdir, *ARGS)), f"config.json: {expected}")
    assert snapshot(workdir) == before


def test_a_read_only_workdir_is_one_error_line(whole, tmp_path):
    """A run directory the process may not write ends before training with one line naming
    the file it could not write: on a read-only mount the lock; for a user who is not root,
    in a directory without write permission (whose lock file is still writable),
    config.json."""
    workdir = tmp_path / "run"
    shutil.copytree(whole, workdir)
    before = snapshot(workdir)
    if os.geteuid() != 0:  # permissions hold for everyone but root
        workdir.chmod(0o555)
        try:
            result = run_main(main_command(workdir, *ARGS))
        finally:
            workdir.chmod(0o755)
        expected = f"cannot write to {workdir / rundir.CONFIG_FILE}: Permission denied"
    else:  # root writes anywhere: mount the directory read-only in a namespace of its own
        _require_namespaces()
        script = f"mount --bind {workdir} {workdir} && mount -o remount,bind,ro {workdir}"
        (result,) = _in_namespace(script, main_command(workdir, *ARGS))
        expected = f"cannot create the lock file {workdir}/.lock: Read-only file system"
    _assert_refused(result, expected)
    assert "; nothing written before is lost: fix that and rerun" in _errors(result)[0]
    after = snapshot(workdir)
    assert {k: v for k, v in after.items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }


# ----- config.json deleted, checkpoints kept -----------------------------------------------------


def _without_checkpoint_6_and(whole, tmp_path, *deleted) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(whole, workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    for name in deleted:
        (workdir / name).unlink()
    return workdir


def test_without_config_json_the_checkpoints_config_is_checked(whole, tmp_path):
    """config.json deleted: another learning rate used to resume silently; the checkpoints
    carry the run's config, so the change is refused as it is with config.json, and the same
    config resumes the same run (and writes config.json again)."""
    workdir = _without_checkpoint_6_and(whole, tmp_path, rundir.CONFIG_FILE)
    before = snapshot(workdir)
    result = run_main(main_command(workdir, *ARGS, "--config.optim.lr=0.1"))
    _assert_refused(
        result, "differs from the config saved with the checkpoint of epoch 4 (optim.lr 0.8 -> 0.1)"
    )
    assert snapshot(workdir) == before
    result = finish(workdir)
    assert "checking this config against the config saved with the checkpoint of epoch 4" in (
        result.stderr
    )
    assert metrics(workdir) == metrics(whole)
    assert (workdir / rundir.CONFIG_FILE).read_text() == (whole / rundir.CONFIG_FILE).read_text()


def test_a_lost_history_is_said_once(whole, tmp_path):
    """config.json and metrics.jsonl deleted: the run resumes from its checkpoint, and says
    that the epochs before it are gone from metrics.jsonl and TensorBoard."""
    workdir = _without_checkpoint_6_and(whole, tmp_path, rundir.CONFIG_FILE, rundir.METRICS_FILE)
    result = finish(workdir)
    warnings = [line for line in result.stderr.splitlines() if "has no record of" in line]
    assert len(warnings) == 1 and "has no record of epochs 1-4" in warnings[0], result.stderr
    assert "missing from metrics.jsonl and TensorBoard" in warnings[0]
    assert metrics(workdir) == metrics(whole)[4:]


def _forget_carried_configs(workdir: Path) -> None:
    """Checkpoints as gdreg wrote them before they carried the run's config."""
    for path in (workdir / "checkpoints").glob("*/_CHECKPOINT_METADATA"):
        values = json.loads(path.read_text())
        values["custom_metadata"] = {}
        path.write_text(json.dumps(values))


def test_checkpoints_without_a_config_and_no_config_json_are_refused(whole, tmp_path):
    workdir = _without_checkpoint_6_and(whole, tmp_path, rundir.CONFIG_FILE)
    _forget_carried_configs(workdir)
    before = snapshot(workdir)
    result = run_main(main_command(workdir, *ARGS, "--config.optim.lr=0.1"))
    _assert_refused(result, "they do not carry their config: there is nothing to check")
    assert "--allow_config_change" in _errors(result)[0]
    assert snapshot(workdir) == before


def test_a_checkpoint_of_another_model_is_never_moved_aside(whole, tmp_path):
    """A readable checkpoint that does not fit the config (here: no config to check first, and
    another width) is not "damaged": the error says what does not fit and advises no restart
    (which would move every good checkpoint aside), even with restart_if_damaged."""
    workdir = _without_checkpoint_6_and(whole, tmp_path, rundir.CONFIG_FILE)
    _forget_carried_configs(workdir)
    before = snapshot(workdir)
    command = main_command(
        workdir,
        *ARGS,
        "--config.model.width=8",
        "--config.checkpoint.restart_if_damaged=True",
        "--allow_config_change",
    )
    result = run_main(command)
    _assert_refused(result, "the checkpoint of epoch 4")
    (error,) = _errors(result)
    assert "does not fit this config: params/" in error and "has shape" in error
    assert "restart_if_damaged" not in error
    after = snapshot(workdir)
    assert {k: v for k, v in after.items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }


# ----- numbers at the edge -------------------------------------------------------------------------


def test_a_divergence_before_any_checkpoint_says_there_is_none(tmp_path):
    """The message used to say "the last good checkpoint ... is intact" with none written."""
    workdir = tmp_path / "run"
    result = run_main(
        main_command(
            workdir,
            *ARGS,
            "--config.optim.lr=10000",
            "--config.optim.clip_norm=0",
            "--config.penalty.strength=0",
            "--config.optim.warmup_epochs=0",
            "--config.checkpoint.every_epochs=0",
        )
    )
    assert result.returncode == 3, result.stderr[-3000:]
    (error,) = _errors(result)
    assert "training diverged" in error and "no checkpoint was written before it" in error
    assert "intact" not in error and "Traceback" not in result.stderr
    assert not os.listdir(workdir / "checkpoints")


def test_a_huge_evaluation_batch_and_warmup_train(tmp_path):
    """eval.batch_size=10**9 allocated 8 * 10**9 indices (MemoryError); warmup_epochs=10**9
    built a table of 10**9 rates (it never finished). A batch beyond the test set is the test
    set; the table of rates ends with the run."""
    workdir = tmp_path / "run"
    result = run_main(
        main_command(
            workdir,
            *ARGS,
            "--config.train.epochs=2",
            "--config.eval.batch_size=1000000000",
            "--config.optim.warmup_epochs=1000000000",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = rundir.read_metrics(workdir)
    assert records[0]["lr"] == 0 and records[1]["lr"] == pytest.approx(0.8 / 10**9, rel=1e-6)
    assert 0 <= records[-1]["test_accuracy"] <= 1


# ----- full disks --------------------------------------------------------------------------------
#
# A full disk, for real: a small tmpfs mounted over the run directory (or a folder of it) in a
# user and mount namespace of the test's own (``unshare --user --map-root-user --mount``, no root
# needed where the kernel allows unprivileged user namespaces). Every writer then gets the very
# error a full cluster file system gives, ENOSPC from write(2): Python's files, orbax's metadata
# and tensorstore's threads alike. The mount lives as long as the namespace, so the commands of
# one test run in one namespace, and the run directory is copied out before it ends.


@functools.cache
def _namespaces() -> str:
    """Why this host cannot mount a tmpfs in a user namespace ("" when it can)."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = Path(__file__).parent  # any directory: the mount is gone with the namespace
    try:
        result = subprocess.run(
            [*_UNSHARE, "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs {shlex.quote(str(probe))}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return "" if result.returncode == 0 else (result.stderr.strip() or "unshare failed")


_UNSHARE = ("unshare", "--user", "--map-root-user", "--mount")


def _require_namespaces() -> None:
    reason = _namespaces()
    if reason:
        pytest.skip(f"needs a user namespace to mount a small file system ({reason})")


def _in_namespace(
    setup: str, *commands: list[str], between: str = "", after: str = ""
) -> list[subprocess.CompletedProcess]:
    """Runs ``commands`` one after another in one user and mount namespace: the shell lines
    ``setup`` first, ``between`` between two commands, ``after`` at the end."""
    results = Path(os.environ.get("TMPDIR", "/tmp")) / f"gdreg-namespace-{os.getpid()}"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir()
    lines = ["set -e", setup, "set +e"]
    for index, command in enumerate(commands):
        if index:
            lines.append(between)
        out = shlex.quote(str(results / str(index)))
        lines.append(f"{shlex.join(command)} >{out}.out 2>{out}.err; echo $? >{out}.rc")
    lines.append(after)
    subprocess.run([*_UNSHARE, "bash", "-c", "\n".join(lines)], cwd=REPO, check=True, timeout=600)
    done = []
    for index, command in enumerate(commands):
        prefix = results / str(index)
        done.append(
            subprocess.CompletedProcess(
                command,
                int(Path(f"{prefix}.rc").read_text()),
                Path(f"{prefix}.out").read_text(),
                Path(f"{prefix}.err").read_text(),
            )
        )
    shutil.rmtree(results)
    return done


@pytest.mark.parametrize(
    ("folder", "size", "names"),
    [
        # the whole run directory: the first write that finds no room ends the run
        ("", "16k", ""),
        # the checkpoints: the first fits, the second (epoch 4) does not (orbax's checkpoints
        # of this run take 90 to 120 KiB: the number of data files varies)
        ("checkpoints", "160k", "the checkpoint of epoch "),
    ],
)
def test_a_full_disk_is_one_error_line_and_a_rerun_with_room_finishes(
    whole, tmp_path, folder, size, names
):
    """The checkpoint write used to end in orbax's RESOURCE_EXHAUSTED traceback (exit 1). Now:
    one line naming the path, the space needed and free, and where a rerun resumes; exit 2
    (not 75, which would requeue the job onto the same full disk); and once there is room, the
    same command finishes the same run."""
    _require_namespaces()
    workdir, copy = tmp_path / "run", tmp_path / "copy"
    mount = workdir / folder if folder else workdir
    mount.mkdir(parents=True)
    copy.mkdir()
    command = main_command(workdir, *ARGS)
    full, freed = _in_namespace(
        f"mount -t tmpfs -o size={size} tmpfs {mount}",
        command,
        command,
        between=f"mount -o remount,size=64m {mount}",
        after=f"cp -a {workdir}/. {copy}/",
    )
    assert full.returncode == 2, full.stderr[-3000:]
    (error,) = _errors(full)
    assert error.startswith(f"error: cannot write {names}") and str(workdir) in error, error
    assert ": No space left on device (" in error and " free there)" in error, error
    assert "; nothing written before is lost: free space there and rerun the same command" in error
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    assert freed.returncode == 0, freed.stderr[-3000:]
    assert metrics(copy) == metrics(whole)


#: Installed as ``sitecustomize`` in a run's process: its TensorBoard event file stops growing
#: with ENOSPC after the second epoch's events, as on a full disk (the events lie in the run
#: directory beside the checkpoints, so a file system of their own cannot be mounted for them).
FULL_EVENT_FILE = """
import errno, io, os, sys

class _Full(io.RawIOBase):
    def __init__(self, raw):
        self.raw, self.writes = raw, 0
    def writable(self):
        return True
    def write(self, data):
        # One write per flush: the opening (header, hyperparameters, config), then one per epoch.
        self.writes += 1
        if self.writes > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.raw.write(data)
    def close(self):
        self.raw.close()
        super().close()

class _Hook:
    def find_spec(self, name, path=None, target=None):
        if name != "gdreg.program.summaries":
            return None
        sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module
        def exec_module(module):
            load(module)
            real = module.EventFile.__init__
            def init(self, logdir):
                real(self, logdir)
                self._file = io.BufferedWriter(_Full(self._file.detach()))
            module.EventFile.__init__ = init
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Hook())
"""


def test_a_full_tensorboard_folder_warns_once_and_training_goes_on(whole, tmp_path):
    """TensorBoard's writer thread died on ENOSPC and training blocked for good on its queue
    (deaf to SIGTERM). Now the events are written in the training thread: the first failure
    turns TensorBoard off with one warning, and the run finishes as if nothing happened."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FULL_EVENT_FILE)
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}
    result = run_main(main_command(workdir, *ARGS), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "TensorBoard" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert "cannot write TensorBoard events" in warnings[0] and "No space left" in warnings[0]
    assert "Traceback" not in result.stderr
    assert metrics(workdir) == metrics(whole)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]


def test_a_console_that_cannot_be_written_stops_nothing(whole, tmp_path):
    """stderr on a full disk (here /dev/full, whose every write fails with ENOSPC): the progress
    lines used to end the run with a traceback; now the run finishes the same."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    workdir = tmp_path / "run"
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            main_command(workdir, *ARGS, "--config.log.progress=True"),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=full,
            text=True,
            timeout=300,
        )
    assert result.returncode == 0 and "done: epoch 6" in result.stdout
    assert metrics(workdir) == metrics(whole)
