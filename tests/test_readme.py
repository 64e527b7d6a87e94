"""The README's code stays true: its snippets are the files the penalty tests execute."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = sorted(path.name for path in (ROOT / "docs").glob("penalty_*.py"))


def test_all_four_framework_snippets_exist():
    assert SNIPPETS == [
        "penalty_data_parallel.py",
        "penalty_jax.py",
        "penalty_linen.py",
        "penalty_nnx.py",
    ]


@pytest.mark.parametrize("name", SNIPPETS)
def test_readme_penalty_snippet_is_the_tested_file_verbatim(name):
    snippet = (ROOT / "docs" / name).read_text()
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{snippet}```" in readme
