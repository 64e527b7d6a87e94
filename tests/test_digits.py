"""The digits demonstration's configs (configs/digits.py); tests/test_readme.py runs the demo
and checks the accuracies the README shows."""

from __future__ import annotations

import importlib.util
import os

import pytest

from gdreg.program import experiment

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
