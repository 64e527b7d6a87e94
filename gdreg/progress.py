"""A one-line console progress bar with the time left, for training and landscape scans."""

from __future__ import annotations

import sys
import time

import jax


class ProgressBar:
    """Draws ``[####....] done/total TEXT left H:MM:SS`` on stderr, from process 0 only.

    On a terminal the line is redrawn in place; otherwise (a log file, SLURM's output) a line
    is written every ``total // lines`` updates and at the end.
    """

    def __init__(self, total: int, *, start: int = 0, enabled: bool = True, lines: int = 20):
        self.total, self.start = total, start
        self.enabled = enabled and jax.process_index() == 0
        self.began = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.every = max(1, (total - start) // lines)

    def update(self, done: int, text: str) -> None:
        """Shows ``done`` of ``total`` finished, with ``text`` after the counter."""
        finished = done == self.total
        if not self.enabled or not (self.tty or finished or (done - self.start) % self.every == 0):
            return
        elapsed = time.perf_counter() - self.began
        left = elapsed / max(done - self.start, 1) * (self.total - done)
        width = 24
        filled = int(width * done / self.total)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {text} left {_duration(left)}"
        end = "\n" if not self.tty or finished else ""
        sys.stderr.write(("\r" if self.tty else "") + line + end)
        sys.stderr.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
