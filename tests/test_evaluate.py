"""Sharded evaluation: every image counts once, on any number of devices; flip averaging."""

import jax
import numpy as np
import pytest

from gdreg.engine.evaluate import Evaluator, flip_averaged
from gdreg.engine.mesh import data_mesh, replicate

RNG = np.random.default_rng(0)
IMAGES = RNG.normal(size=(11, 4, 4, 1)).astype(np.float32)
LABELS = RNG.integers(0, 3, 11).astype(np.int32)
WEIGHTS = RNG.normal(size=(16, 3)).astype(np.float32)


def predict(params, model_state, inputs):
    del model_state
    return inputs.reshape(len(inputs), -1) @ params


def batch_fn(data, indices, step):
    del step
    return data[0][indices], data[1][indices]


def reference(logits):
    log_probs = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    loss = -np.mean(log_probs[np.arange(len(LABELS)), LABELS])
    return loss, np.mean(np.argmax(logits, 1) == LABELS)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_every_image_counts_once(num_devices):
    mesh = data_mesh(jax.devices()[:num_devices])
    evaluator = Evaluator(predict, batch_fn, mesh=mesh, batch_size=4)
    result = evaluator(replicate(WEIGHTS, mesh), {}, replicate((IMAGES, LABELS), mesh), 11)
    loss, accuracy = reference(IMAGES.reshape(11, -1) @ WEIGHTS)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["accuracy"] == pytest.approx(accuracy)


def test_flip_averaging_averages_the_probabilities_of_both_views():
    mesh = data_mesh(jax.devices()[:2])
    evaluator = Evaluator(flip_averaged(predict), batch_fn, mesh=mesh, batch_size=4)
    result = evaluator(replicate(WEIGHTS, mesh), {}, replicate((IMAGES, LABELS), mesh), 11)
    plain = IMAGES.reshape(11, -1) @ WEIGHTS
    flipped = IMAGES[:, :, ::-1, :].reshape(11, -1) @ WEIGHTS
    probs = (np.asarray(jax.nn.softmax(plain)) + np.asarray(jax.nn.softmax(flipped))) / 2
    loss, accuracy = reference(np.log(probs))
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["accuracy"] == pytest.approx(accuracy)
    assert not np.allclose(plain, flipped)
