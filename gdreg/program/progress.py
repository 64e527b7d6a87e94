"""Console progress of training and landscape scans: tqdm on a terminal, plain lines elsewhere.

Progress is never a reason to stop: when the console cannot be written (a log file on a full
disk, a closed pipe), the bar says so once, through the log, and stays quiet from then on.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

import jax
from tqdm import tqdm


class ProgressBar:
    """Progress of a loop of ``total`` units, on stderr, from process 0 only.

    On a terminal: a tqdm bar (counter, rate, elapsed and remaining time) with ``text`` after
    it. Elsewhere (a log file, SLURM's output) no control characters: a plain line
    ``step done/total TEXT elapsed H:MM:SS left H:MM:SS`` every ``total // lines`` updates and
    at the end.
    """

    def __init__(
        self,
        total: int,
        *,
        start: int = 0,
        enabled: bool = True,
        lines: int = 20,
        unit: str = "step",
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.start, self.unit = total, start, unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and jax.process_index() == 0
        self.every = max(1, (total - start) // lines)
        self.began = time.perf_counter()
        self._bar = None
        try:
            if self.enabled and self.stream.isatty():
                self._bar = tqdm(
                    total=total, initial=start, unit=unit, file=self.stream, dynamic_ncols=True
                )
        except (OSError, ValueError) as error:
            self._fail(error)

    def update(self, done: int, text: str) -> None:
        """Shows ``done`` of ``total`` finished, with ``text`` (the latest figures)."""
        if not self.enabled:
            return
        try:
            self._show(done, text)
        except (OSError, ValueError) as error:  # ValueError: the stream was closed
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        self.enabled = False
        self._bar = None
        logging.warning(
            "cannot write the progress to the console (%s): the progress is off for the rest "
            "of this run",
            error.strerror if isinstance(error, OSError) and error.strerror else error,
        )

    def _show(self, done: int, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(done - self._bar.n)
            return
        if done != self.total and (done - self.start) % self.every != 0:
            return
        elapsed = time.perf_counter() - self.began
        left = elapsed / max(done - self.start, 1) * (self.total - done)
        self.stream.write(
            f"{self.unit} {done}/{self.total} {text} elapsed {_duration(elapsed)} "
            f"left {_duration(left)}\n"
        )
        self.stream.flush()

    def close(self) -> None:
        """Ends the bar (a final newline on a terminal)."""
        if self._bar is not None:
            bar, self._bar = self._bar, None
            try:
                bar.close()
            except (OSError, ValueError) as error:
                self._fail(error)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
