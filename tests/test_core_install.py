"""The penalty installs and runs with the core dependencies alone (jax, flax, optax).

No network here, so instead of a fresh virtual environment the test hides, in a subprocess,
every module that only the "train" extra brings (computed from the installed packages'
metadata, so it follows pyproject.toml), then imports gdreg and runs docs/penalty.md's plain-JAX
snippet.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = {"jax", "flax", "optax", "numpy"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _closure(names: set[str]) -> set[str]:
    """The installed distributions that ``names`` need, transitively (extras ignored)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def _hidden_modules() -> list[str]:
    """Top-level modules of the distributions that the train extra adds to the core."""
    train = {_name(r) for r in _project()["optional-dependencies"]["train"]}
    only_train = _closure(train) - _closure(CORE)
    modules = set()
    for module, distributions in importlib.metadata.packages_distributions().items():
        if any(_name(d) in only_train for d in distributions):
            modules.add(module)
    return sorted(modules)


def test_core_dependencies_are_jax_flax_optax_numpy():
    assert {_name(r) for r in _project()["dependencies"]} == CORE
    dev = _project()["optional-dependencies"]["dev"]
    assert any(r.startswith("gdreg[") and "train" in r for r in dev), dev


def test_penalty_and_snippet_run_without_the_training_extra():
    hidden = _hidden_modules()
    # The packages users complained about are among the hidden ones.
    for module in ("tensorflow", "tensorflow_datasets", "sklearn", "matplotlib", "ml_collections"):
        assert module in hidden
    code = f"""
import importlib.abc, runpy, sys
HIDDEN = set({hidden!r})

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)")
        return None

ALREADY = set(sys.modules)  # the interpreter's start-up (site hooks such as setuptools')
sys.meta_path.insert(0, Hide())
import gdreg
for name in gdreg.__all__:
    getattr(gdreg, name)
try:
    import gdreg.main
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the hiding did not work: gdreg.main imported")
runpy.run_path({str(ROOT / "docs" / "penalty_jax.py")!r}, run_name="__main__")
loaded = sorted(m for m in set(sys.modules) - ALREADY if m.split(".")[0] in HIDDEN)
assert not loaded, loaded
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        # A user's plain environment: one device, no compilation cache of the test session.
        env={
            key: value
            for key, value in os.environ.items()
            if key not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 5: loss" in result.stdout


def test_training_program_without_the_extra_says_what_to_install():
    code = """
import importlib.util, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "ml_collections" else real(name, *a)
from gdreg import console
console.train()
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: gdreg-train needs the training dependencies, missing here: ml_collections; "
        'install them with: pip install "gdreg[train]"'
    ]


def test_public_names_are_exported():
    import gdreg
    import gdreg.penalty

    assert gdreg.__all__ == gdreg.penalty.__all__
    for name in gdreg.__all__:
        assert getattr(gdreg, name) is getattr(gdreg.penalty, name)
        if name != "METHODS":
            assert getattr(gdreg, name).__module__.startswith("gdreg.penalty.")
    assert gdreg.penalty.linen.PenaltyTrainState is gdreg.PenaltyTrainState
