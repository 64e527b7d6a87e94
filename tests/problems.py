"""A tiny BatchNorm CNN problem shared by the full-batch tests and their multi-process worker."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gdreg.models import layers

NUM_IMAGES = 48
BLOCK_SIZE = 6


class TinyBNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = layers.batch_norm(train, dtype=None)(x)
        x = nn.relu(x)
        x = nn.Conv(4, (3, 3), strides=2)(x)
        x = jnp.tanh(x).mean(axis=(1, 2))
        return nn.Dense(3)(x)


MODEL = TinyBNNet()


def dataset(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(NUM_IMAGES, 6, 6, 2)).astype(np.float32)
    labels = rng.integers(0, 3, NUM_IMAGES).astype(np.int32)
    return images, labels


def init(seed: int = 0):
    images, _ = dataset()
    variables = MODEL.init(jax.random.key(seed), images[:2], train=False)
    variables = jax.tree.map(np.asarray, variables)
    params = variables.pop("params")
    return params, dict(variables)


def loss_fn(params, model_state, inputs, labels):
    logits, new_state = MODEL.apply(
        {"params": params, **model_state}, inputs, train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (new_state, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)})


def batch_fn(data, indices, step):
    del step
    images, labels = data
    return images[indices], labels[indices]


class TinyBatchNormNet(nn.Module):
    """conv -> BatchNorm -> relu, twice, -> mean pool -> dense: the smallest registered model
    with BatchNorm layers that feed each other (for the training-loop tests)."""

    num_classes: int
    width: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(2):
            x = layers.conv(self.width, 3, dtype=self.dtype)(x)
            x = nn.relu(layers.batch_norm(train, dtype=self.dtype)(x))
        return layers.dense(self.num_classes, dtype=self.dtype)(x.mean(axis=(1, 2)))


#: The registry name of :class:`TinyBatchNormNet` (test models end in ``_test``).
TINY_BATCHNORM_MODEL = "tiny_batchnorm_test"


def register_tiny_batchnorm_model() -> str:
    """Registers :class:`TinyBatchNormNet` (width default 4) and returns its name."""
    from gdreg.models import register_model

    register_model(TINY_BATCHNORM_MODEL, _tiny_batchnorm_net)
    return TINY_BATCHNORM_MODEL


def _tiny_batchnorm_net(*, num_classes, width, dtype):
    return TinyBatchNormNet(num_classes, width or 4, dtype)


def tiny_run_config():
    """A training config that runs in about a second per epoch: small CNN, 8x8 synthetic data.

    Callers set the mode, epochs, blocks and schedule they test.
    """
    from gdreg.program.config import base_config

    config = base_config()
    config.model.name = "convnet1"
    config.model.width = 4
    config.data.name = "synthetic"
    config.data.synthetic_shape = (8, 8, 3)
    config.data.synthetic_train_size = 128
    config.data.synthetic_test_size = 64
    config.data.padding = 1
    config.log.progress = False
    return config
