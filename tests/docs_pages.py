"""Reading the manual's pages: their fenced blocks and the commands in them (for the tests).

A ``sh`` block holds commands a reader types: each (``\\``-continued lines joined) is run by a
test, unless it, or the block's first line, says what it needs in a ``# needs:`` comment (a
GPU, network or SLURM). ``text`` blocks are synopses and printed output.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDS = re.compile(r"#\s*needs:\s*(a GPU|GPU|network|SLURM)\b")


def blocks(page: Path, language: str) -> list[str]:
    """The contents of ``page``'s fenced blocks of ``language``."""
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL)


def languages(page: Path) -> set[str]:
    """The languages of ``page``'s fenced blocks ("" for a bare fence)."""
    fences = re.findall(r"^```(\w*)$", page.read_text(), re.MULTILINE)
    return set(fences[0::2])  # opening fences only


def commands(page: Path) -> tuple[list[str], list[str]]:
    """(commands to run, commands marked as needing more) of ``page``'s ``sh`` blocks."""
    run, marked = [], []
    for block in blocks(page, "sh"):
        logical = block.replace("\\\n", " ").splitlines()
        logical = [line.strip() for line in logical if line.strip()]
        block_marked = bool(logical) and logical[0].startswith("#") and NEEDS.search(logical[0])
        for line in logical:
            if line.startswith("#") and not NEEDS.search(line):
                continue
            if line.startswith("#"):
                continue  # the block's own mark
            (marked if block_marked or NEEDS.search(line) else run).append(line)
    return run, marked
