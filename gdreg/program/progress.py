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

#: The terminal width the bar is laid out for: counters, times and the figures fit in it.
COLUMNS = 80
#: What the bar says until the first unit is done: that unit compiles the programs.
COMPILING = "compiling (the first one takes longer)"


class ProgressBar:
    """Progress of a loop of ``total`` units, on stderr, from process 0 only.

    On a terminal: one line of at most :data:`COLUMNS` characters, ``done/total UNITs
    [elapsed<remaining, TEXT]``. Elsewhere (a log file, SLURM's output) no control characters:
    a plain line ``UNIT done/total TEXT elapsed H:MM:SS left H:MM:SS`` every ``total // lines``
    updates and at the end. Until the first update it says that the first unit compiles
    (:data:`COMPILING`), which is where a fresh run spends its first minute.
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
        self.enabled = enabled and jax.process_index() == 0 and start < total
        self.every = max(1, (total - start) // lines)
        self.began = time.perf_counter()
        self._bar = None
        if not self.enabled:
            return
        try:
            if self.stream.isatty():
                self._bar = tqdm(
                    total=total,
                    initial=start,
                    unit=unit,
                    file=self.stream,
                    ncols=COLUMNS,
                    # tqdm puts ", " before the postfix: the figures close the bracket.
                    bar_format="{n_fmt}/{total_fmt} {unit}s [{elapsed}<{remaining}{postfix}]",
                )
                self._bar.set_postfix_str(COMPILING)
            else:
                self.stream.write(f"{unit} {start}/{total} {COMPILING}\n")
                self.stream.flush()
        except (OSError, ValueError) as error:  # ValueError: the stream was closed
            self._fail(error)

    def update(self, done: int, text: str) -> None:
        """Shows ``done`` of ``total`` finished, with ``text`` (the latest figures)."""
        if not self.enabled:
            return
        try:
            self._show(done, text)
        except (OSError, ValueError) as error:
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
