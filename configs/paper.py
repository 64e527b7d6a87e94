"""The paper's tables for any model: ``configs/paper.py:MODEL,ROW`` (Geiping et al., ICLR 2022).

    python -m gdreg.main --config configs/paper.py:resnet50,strong --workdir runs/resnet50/strong

``MODEL`` is any registered model (the paper's Table 2 uses ``resnet50``, ``resnet152`` and
``densenet121``; default ``resnet18``), ``ROW`` a row of ``gdreg.program.config.PAPER_TABLE``
(default ``regularized``): ``sgd``, ``fb_baseline``, ``longer``, ``clipped``, ``regularized``,
``strong``, ``practice``, and the fixed-dataset rows ``sgd_noaug``, ``strong_noaug``,
``sgd_copies``, ``fb_copies``, ``strong_copies``. Either part may be given alone
(``paper.py:densenet121``, ``paper.py:strong``); with no argument this is the paper's
"FB regularized" ResNet-18 run, i.e. every field at its default (``gdreg/program/config.py``).
"""

from gdreg.models import model_names
from gdreg.program.config import PAPER_TABLE, ConfigError, paper_config


def get_config(arg: str = ""):
    parts = [part.strip() for part in arg.split(",")] if arg else []
    if len(parts) > 2:
        raise ConfigError(f"paper.py takes MODEL,ROW, got {arg!r}")
    if len(parts) == 2:
        model, row = parts
    elif not parts:
        model, row = "resnet18", "regularized"
    elif parts[0] in PAPER_TABLE:
        model, row = "resnet18", parts[0]
    elif parts[0].lower() in model_names():
        model, row = parts[0], "regularized"
    else:
        raise ConfigError(
            f"paper.py:{arg}: {parts[0]!r} is neither a row {tuple(PAPER_TABLE)} nor a model "
            f"{tuple(model_names())}"
        )
    # An unknown model in MODEL,ROW is reported with the rest of the config at build time.
    return paper_config(model, row)
