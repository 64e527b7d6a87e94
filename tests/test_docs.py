"""The manual in docs/ stays true: every command it shows is run, or says what it needs.

Each page's ``sh`` commands (see tests/docs_pages.py) run here, in order, in an empty folder
with the checkout's ``configs`` and ``launch`` beside them, on CPU without network, unless
marked ``# needs:`` a GPU, network or SLURM; docs/results.md and docs/penalty.md have tests of
their own that run theirs, and the README's are run by tests/test_readme.py.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
from docs_pages import ROOT, commands, languages

#: Pages whose commands another test runs: that test's file.
OWN_TESTS = {"results.md": "test_results_doc.py", "penalty.md": "test_penalty_docs.py"}
PAGES = sorted(path.name for path in (ROOT / "docs").glob("*.md"))
RUN_HERE = [page for page in PAGES if page not in OWN_TESTS]


def test_every_page_is_checked_by_a_test():
    for page, test in OWN_TESTS.items():
        assert page in PAGES and (ROOT / "tests" / test).is_file()
    assert {"options.md", "runs.md", "fullbatch.md", "performance.md", "clusters.md"} <= set(
        RUN_HERE
    )


@pytest.mark.parametrize("page", PAGES)
def test_blocks_are_commands_code_or_text(page):
    allowed = {"sh", "text", ""} | ({"python", "diff", "bash"} if page == "penalty.md" else set())
    assert languages(ROOT / "docs" / page) <= allowed


@pytest.mark.parametrize("page", [page for page in RUN_HERE if commands(ROOT / "docs" / page)[0]])
def test_the_commands_of_the_page_run(page, tmp_path):
    for name in ("configs", "launch"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(ROOT), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    for line in commands(ROOT / "docs" / page)[0]:
        args = shlex.split(line, comments=True)
        if args[:2] == ["python", "-m"]:
            args = [sys.executable, *args[1:]]
        result = subprocess.run(
            args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
