"""The console scripts (``gdreg-train``, ``gdreg-report``, ...): launchers by module name.

Like the wrapper scripts pip writes for ``[project.scripts]``, each entry point names the module
it starts instead of importing it, so that it can first check that the training program's
dependencies (the "train" extra) are installed and say what to install in one line; the penalty
alone needs none of them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable

from gdreg.program import exitcodes

#: Top-level modules of the "train" extra that the programs import (the penalty needs none;
#: orbax and absl are not listed: flax and optax bring them).
TRAINING_MODULES = (
    "ml_collections",
    "tensorflow_datasets",
    "matplotlib",
    "sklearn",
    "tensorboardX",
    "tqdm",
)


def missing_training_modules() -> list[str]:
    """The modules of the "train" extra that cannot be imported here."""
    return [name for name in TRAINING_MODULES if importlib.util.find_spec(name) is None]


def _program(module: str, command: str) -> Callable[[], None]:
    def entry() -> None:
        missing = missing_training_modules()
        if missing:
            print(
                f"error: {command} needs the training dependencies, missing here: "
                f'{", ".join(missing)}; install them with: pip install "gdreg[train]"',
                file=sys.stderr,
            )
            sys.exit(exitcodes.BAD_INPUT)
        importlib.import_module(module).run()

    entry.__doc__ = f"The ``{command}`` console script: ``{module}.run`` once its imports exist."
    return entry


train = _program("gdreg.main", "gdreg-train")
report = _program("gdreg.tools.report", "gdreg-report")
landscape = _program("gdreg.tools.landscape", "gdreg-landscape")
bench = _program("gdreg.tools.bench", "gdreg-bench")
precision = _program("gdreg.tools.precision", "gdreg-precision")
evaluate = _program("gdreg.tools.evaluate", "gdreg-evaluate")
# It also needs PyTorch (the "torch" extra) to read the file, and says so itself in one line.
convert_reference = _program("gdreg.tools.convert_reference", "gdreg-convert-reference")
