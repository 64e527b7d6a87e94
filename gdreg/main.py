"""Command line: ``python -m gdreg.main --config configs/resnet18_fb.py[:variant] --workdir DIR``.

Fields are overridden as ``--config.optim.lr=0.4``. When started as one of several processes
(SLURM, or ``--coordinator_address`` with ``--num_processes``/``--process_id``), the JAX
distributed runtime is initialized first; see ``launch/``.

One of several processes runs the training in a child process and watches it
(:mod:`gdreg.program.supervisor`), so that a lost peer ends the run in one line.

Exit codes (:mod:`gdreg.program.exitcodes`): 0 done; 2 a flag, config, dataset or run-directory
error (one ``error:`` line; also: the processes got different configs, incomplete multi-process
flags, the workdir is in use by another run, a resume with a changed config needs
``--allow_config_change``, no checkpoint can be read, and the run directory cannot be written,
e.g. a full disk: nothing written before is lost, and the line says where a rerun resumes); 3
training diverged; 4 not all processes joined within ``--initialization_timeout``; 75
preempted (SIGTERM/SIGINT/SIGHUP at any moment: a checkpoint was saved if a step had finished;
rerun with the same ``--workdir``); 76 another process of a multi-process run was lost (killed,
crashed, stopped, or silent for ``--heartbeat_timeout`` seconds; one ``error:`` line names it;
rerun every process to resume from the last checkpoint); 128 + N killed by signal N.
"""

from __future__ import annotations

# First of all, before the imports below (absl, ml_collections, numpy: a few hundred
# milliseconds): from now on SIGTERM/SIGINT/SIGHUP are remembered, and the run stops cleanly
# (exit 75) at the next point where it can, also during start-up and compilation.
from gdreg.program import preemption

STOP = preemption.StopRequest().install()

import logging  # noqa: E402
import sys  # noqa: E402

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gdreg.program import cli, exitcodes, supervisor  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints; reruns resume.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.DEFINE_integer(
    "initialization_timeout",
    300,
    "Seconds to wait for all processes to join; a process still waiting then exits with code 4.",
)
flags.DEFINE_integer(
    "heartbeat_timeout",
    supervisor.DEFAULT_HEARTBEAT_TIMEOUT,
    "Seconds without a heartbeat after which a process of a multi-process run counts as lost; "
    "the others then exit with code 76.",
    lower_bound=1,
)
flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume even if the config differs from the run's config.json in fields that change the "
    "result (the change is kept in config_history.jsonl); model and data shapes never change.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    with STOP as stop:  # installed when this module loaded; restored when done
        if stop.requested and supervisor.multi_process_launch(sys.argv) is None:
            # A single process stops before it loads anything (several decide together, after
            # joining: one alone would leave the others waiting).
            print(
                "preempted: stopped during start-up, before anything was written; rerun to resume",
                file=sys.stderr,
            )
            return exitcodes.PREEMPTED
        return _start(stop)


def _start(stop: preemption.StopRequest) -> int:
    logging.getLogger().setLevel(logging.INFO)
    # Libraries that log through absl (orbax: dozens of lines per checkpoint) speak only up
    # from warnings; gdreg's own messages go through the root logger.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from gdreg.program import config as config_lib

    try:
        # The schema's checks need no JAX: a mistake in a field is reported in a second,
        # before JAX, the data and the runtime load (the model and the data are checked later).
        config_lib.validate(FLAGS.config)
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    from gdreg.program import distributed

    train_config = FLAGS.config.get("train", {})
    distributed.configure_cpu_devices(
        distributed.cpu_devices_for(
            train_config.get("cpu_devices", 0),
            fullbatch=train_config.get("mode", "fullbatch") == "fullbatch"
            and not train_config.get("switch_mode_after", 0),
            batch_size=train_config.get("batch_size", 0),
        )
    )
    try:
        distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
            timeout_seconds=FLAGS.initialization_timeout,
            heartbeat_timeout=FLAGS.heartbeat_timeout,
        )
        distributed.check_same_config(FLAGS.config, FLAGS.workdir)
        code = _train(stop)
    except distributed.StartupError as error:
        print(f"error: {error}", file=sys.stderr)
        code = exitcodes.BAD_INPUT
    except Exception as error:
        if distributed.lost_contact(error):  # a peer is gone: the runtime names it
            distributed.await_runtime_verdict(error, FLAGS.heartbeat_timeout)
        raise
    # Every process gets here with the same code (the errors above are raised on every
    # process alike), so leaving the runtime together does not wait on a missing process.
    distributed.shutdown()
    return code


def _train(stop: preemption.StopRequest) -> int:
    from gdreg import data
    from gdreg.program import config, rundir
    from gdreg.program import loop as train

    try:
        record = train.train_and_evaluate(
            FLAGS.config,
            FLAGS.workdir,
            stop=stop,
            allow_config_change=FLAGS.allow_config_change,
        )
    except (config.ConfigError, data.DatasetNotFoundError, rundir.RunDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    except train.TrainingDivergedError as error:  # the message says which checkpoint is kept
        print(f"error: training diverged: {error}", file=sys.stderr)
        return exitcodes.DIVERGED
    except OSError as error:  # a file the system refused that no check above foresaw
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return exitcodes.BAD_INPUT
    except train.Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr)
        return exitcodes.PREEMPTED
    summary = ", ".join(
        f"{key} {100 * record[key]:.2f}%"
        if key.endswith("accuracy")
        else f"{key} {record[key]:.4f}"
        for key in ("train_loss", "test_loss", "test_accuracy")
        if key in record
    )
    print(f"done: epoch {record.get('epoch')}: {summary}")
    return exitcodes.DONE


def run() -> None:
    """Console entry point ``gdreg-train`` (the same as ``python -m gdreg.main``)."""
    if not supervisor.attach(STOP):
        launch = supervisor.multi_process_launch(sys.argv)
        if launch is not None:  # one of several processes: train in a watched child
            sys.exit(supervisor.supervise(sys.argv, STOP, launch))
    cli.run_command(main, __doc__)


if __name__ == "__main__":
    run()
