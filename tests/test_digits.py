"""The digits demonstration (configs/digits.py) trains to a real test accuracy on CPU."""

from __future__ import annotations

import importlib.util
import os

import pytest

from gdreg.program import experiment, rundir
from gdreg.program import loop as train

CONFIG_FILE = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "digits.py")


def digits_config(variant: str):
    spec = importlib.util.spec_from_file_location("digits_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.mark.parametrize("variant", ["sgd", "fb", "fb_clip", "fb_clip_reg"])
def test_variants_are_valid_digits_configs(variant):
    config = digits_config(variant)
    experiment.validate(config)
    assert config.data.name == "digits"
    assert config.data.flip is False  # a mirrored digit is another symbol
    assert (config.train.mode == "stochastic") == (variant == "sgd")
    assert (config.optim.clip_norm > 0) == (variant in ("fb_clip", "fb_clip_reg"))
    assert (config.penalty.strength > 0) == (variant == "fb_clip_reg")


def test_unknown_variant_names_the_known_ones():
    with pytest.raises(ValueError, match="fb_clip_reg"):
        digits_config("fb_reg")


def test_fb_clip_reg_reaches_90_percent_test_accuracy(tmp_path):
    config = digits_config("fb_clip_reg")
    config.log.progress = False
    config.checkpoint.every_epochs = 0  # only the final checkpoint
    record = train.train_and_evaluate(config, str(tmp_path))
    assert record["epoch"] == config.train.epochs
    assert record["test_accuracy"] >= 0.90, record
    metrics = rundir.read_metrics(str(tmp_path))
    assert len(metrics) == config.train.epochs
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
