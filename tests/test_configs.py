"""Every config file and variant that the README and the manual name loads, validates and builds a
run."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from gdreg import data
from gdreg.program import config as config_lib
from gdreg.program import experiment

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def load_config_file(name: str):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_config_arguments() -> set[tuple[str, str | None]]:
    """(file, argument) of every ``configs/FILE.py[:ARG]`` in the README and docs/ (no ARG:
    None)."""
    text = "\n".join(path.read_text() for path in [REPO / "README.md", *REPO.glob("docs/*.md")])
    found = re.findall(r"configs/(\w+)\.py(?::([\w,]+))?", text)
    return {(name, arg or None) for name, arg in found}


def every_variant() -> list[tuple[str, str | None]]:
    variants = [("resnet18_fb", v) for v in load_config_file("resnet18_fb").VARIANTS]
    variants += [("digits", v) for v in load_config_file("digits").VARIANTS]
    variants += [
        ("paper", f"{model},{row}")
        for model in config_lib.PAPER_MODELS
        for row in config_lib.PAPER_TABLE
    ]
    return variants


def test_the_readme_and_the_manual_name_only_variants_that_exist():
    arguments = readme_config_arguments()
    assert ("resnet18_fb", "quick") in arguments and ("paper", "resnet50,strong") in arguments
    known = set(every_variant())
    for name, arg in arguments:
        assert (CONFIGS / f"{name}.py").is_file(), name
        if arg is not None and any(part.isupper() for part in arg.split(",")):
            continue  # a placeholder such as VARIANT or resnet50,ROW
        module = load_config_file(name)
        config = module.get_config(arg) if arg is not None else module.get_config()
        experiment.validate(config)
        if name != "paper" and arg is not None:
            assert (name, arg) in known


@pytest.mark.parametrize(("name", "arg"), every_variant(), ids=lambda value: str(value))
def test_every_variant_validates_and_builds(name, arg):
    config = load_config_file(name).get_config(arg)
    experiment.validate(config)
    if config.data.name in ("cifar10", "cifar100"):  # no network here: same shape, made up
        config.data.name = "synthetic"
        config.data.synthetic_train_size = 256
        config.data.synthetic_test_size = 16
        config.data.train_size = config.data.test_size = 0
    run = experiment.build(config)
    assert run.model is not None and run.num_virtual_images >= config.train.block_size


def test_paper_config_arguments():
    paper = load_config_file("paper")
    assert (
        paper.get_config().to_dict() == config_lib.paper_config("resnet18", "regularized").to_dict()
    )
    assert paper.get_config("strong").model.name == "resnet18"
    assert paper.get_config("densenet121").row == "regularized"
    with pytest.raises(config_lib.ConfigError, match="unknown row"):
        paper.get_config("resnet50,strongest")
    with pytest.raises(config_lib.ConfigError, match="neither a row"):
        paper.get_config("stong")
    with pytest.raises(config_lib.ConfigError, match=r"model\.name: unknown model 'resnet7'"):
        experiment.validate(paper.get_config("resnet7,strong"))
    # Model names are case-insensitive, as in the registry.
    experiment.validate(paper.get_config("ResNet50,strong"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model.name", "resnet7"),
        ("model.dtype", "int8"),
        ("data.name", "imagenet21k"),
        ("data.augmentation", "sometimes"),
        ("data.copies", 0),
        ("data.padding", -2),
        ("train.mode", "online"),
        ("train.block_loop", "spin"),
        ("train.autotune", "sometimes"),
        ("train.autotune_seconds", -1.0),
        ("optim.lr", -0.1),
        ("optim.schedule", "step"),
        ("penalty.method", "backward"),
        ("penalty.full_strength", -1.0),
        ("eval.batch_size", 0),
        ("checkpoint.keep", 0),
        ("optim.lr", float("nan")),
        ("optim.weight_decay", float("inf")),
        ("penalty.eps", float("inf")),
        ("analysis.flatness_threshold", float("inf")),
        ("seed", 2**32 - 1),
        ("model.dtype", "float8_e5m2"),
    ],
)
def test_validate_names_the_bad_field(field, value):
    config = config_lib.base_config()
    config_lib.set_field(config, field, value)
    with pytest.raises(config_lib.ConfigError, match=re.escape(field)):
        experiment.validate(config)


def test_a_run_whose_steps_overflow_the_step_counter_is_refused():
    """10**6 epochs of 4096 single-image steps: more optimizer steps than int32 counts."""
    config = config_lib.base_config()
    config.data.name = "synthetic"
    config.data.synthetic_shape = (4, 4, 1)
    config.data.synthetic_train_size = 4096
    config.train.mode = "stochastic"
    config.train.batch_size = 1
    config.train.epochs = 10**6
    with pytest.raises(config_lib.ConfigError, match=r"^train\.epochs 1000000 takes 4096000000"):
        experiment.build(config)


def test_library_errors_are_blamed_on_the_field():
    field_named = r"^data\.npz_path='x': file not found$"
    with pytest.raises(config_lib.ConfigError, match=field_named), config_lib.blame("data"):
        raise ValueError("npz_path='x': file not found")
    section_named = r"^model: num_classes must be positive$"
    with pytest.raises(config_lib.ConfigError, match=section_named), config_lib.blame("model"):
        raise ValueError("num_classes must be positive")


def test_a_missing_tfds_dataset_names_the_flag(tmp_path):
    config = config_lib.paper_config("resnet18", "strong")
    config.data.data_dir = str(tmp_path)
    config.data.download = False
    with pytest.raises(data.DatasetNotFoundError) as info:
        experiment.load_data(config)
    message = str(info.value)
    assert "pass that folder as data_dir (--config.data.data_dir). Without the data, " in message
    assert message.endswith(
        "--config.data.name=synthetic runs the same pipeline on synthetic images, and "
        "launch/digits_demo.sh trains on real data that ships with scikit-learn"
    ), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("model", "parameters"),
    [("resnet18", 11_173_962), ("resnet50", 23_520_842), ("densenet121", 6_956_298)],
)
def test_paper_configs_build_the_papers_networks(model, parameters):
    import jax
    import numpy as np

    config = config_lib.paper_config(model, "strong", dataset="synthetic")
    config.data.synthetic_train_size, config.data.synthetic_test_size = 64, 8
    run = experiment.build(config)
    variables = jax.eval_shape(
        lambda: run.model.init(jax.random.key(0), np.zeros((1, 32, 32, 3)), train=False)
    )
    assert sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"])) == parameters


def test_a_run_from_before_the_batchnorm_rules_resumes_only_with_its_own_rule(tmp_path):
    """Its config.json has no train.batchnorm_statistics: it trained with the order-free rule,
    so reading it gives "mean", and resuming it under today's default is a config change."""
    import json

    from gdreg.program import rundir

    config = config_lib.base_config()
    saved = json.loads(config.to_json_best_effort())
    del saved["train"]["batchnorm_statistics"]
    (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps(saved))
    old = rundir.read_config(str(tmp_path))
    assert old.train.batchnorm_statistics == "mean"
    with pytest.raises(config_lib.ConfigError, match=r"train\.batchnorm_statistics"):
        config_lib.resume_changes(old, config_lib.base_config(), allow=False)
    old.train.batchnorm_statistics = "reference"  # the user's explicit choice to switch
    assert config_lib.resume_changes(old, config_lib.base_config(), allow=False) == {}
