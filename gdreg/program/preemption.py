"""SIGTERM and SIGINT (SLURM preemption, Ctrl-C): remembered, so the run can stop cleanly.

``gdreg.main`` installs the handler before anything else (distributed start-up, data loading,
compilation), so a signal at any moment is remembered instead of killing the process; the
training loop asks :meth:`StopRequest.any_process` before the first epoch and after every
epoch, saves a checkpoint and exits with :data:`gdreg.program.exitcodes.PREEMPTED`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

import numpy as np


class StopRequest:
    """Remembers a SIGTERM/SIGINT while installed (as a context manager)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for signum in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread signals cannot be caught; leave them alone there.
            with contextlib.suppress(ValueError):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del frame
        if self.requested:  # a second signal: the user means it (Ctrl-C twice)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        logging.warning(
            "received signal %d: stopping at the end of this epoch (again: stop at once)", signum
        )
        self.requested = True

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def any_process(self) -> bool:
        """Whether any process got a signal (a collective call: every process must make it)."""
        import jax

        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags))
