"""The README's penalty section points to the manual, docs/penalty.md (tests/test_penalty_docs.py
keeps that page's snippets true)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_links_the_penalty_manual():
    readme = (ROOT / "README.md").read_text()
    assert "[docs/penalty.md](docs/penalty.md)" in readme
    assert (ROOT / "docs" / "penalty.md").is_file()
