"""The README's code stays true: its snippet is the file the penalty tests execute."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_penalty_snippet_is_the_tested_file_verbatim():
    snippet = (ROOT / "docs" / "penalty_snippet.py").read_text()
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{snippet}```" in readme
