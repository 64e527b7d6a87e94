"""Exit codes of gdreg's programs (``gdreg.main``, ``gdreg.tools.landscape``,
``gdreg.tools.report``, ``gdreg.tools.bench``, ``gdreg.tools.precision``).

``launch/slurm.sbatch`` requeues a job on :data:`PREEMPTED` and :data:`LOST_PROCESS`; scripts
may test the others. A process killed by a signal ends with 128 + the signal, as a shell reports
it.
"""

DONE = 0
#: A bad config field, argument, dataset or run directory (one ``error:`` line says which); also
#: processes started with different configs or incomplete multi-process flags, and a run
#: directory that cannot be written (a full disk, a quota, a read-only mount). Then nothing
#: written before is lost and the line says where a rerun resumes; not :data:`PREEMPTED`, so
#: that ``launch/slurm.sbatch`` does not requeue the job onto the same full disk.
BAD_INPUT = 2
#: The loss or gradient became NaN or infinite; the last good checkpoint is intact.
DIVERGED = 3
#: Not every process joined the distributed runtime in time.
JOIN_TIMEOUT = 4
#: Stopped by SIGTERM/SIGINT/SIGHUP after saving a checkpoint (EX_TEMPFAIL): rerun to resume.
PREEMPTED = 75
#: Another process of a multi-process run was lost (killed, crashed, stopped, or silent for
#: ``--heartbeat_timeout`` seconds); this one stopped without a new checkpoint (one ``error:``
#: line names the lost process): rerun every process to resume from the last checkpoint.
LOST_PROCESS = 76
