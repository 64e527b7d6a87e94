"""Sharded evaluation: mean loss and accuracy of a model over a whole image set.

Every image counts exactly once: the set is split into batches of ``batch_size`` images per
device, the last batch padded with zero-weight entries, and the per-device sums reduced
once at the end (:func:`gdreg.engine.mesh.pad_with_zero_weights`), as in
:mod:`gdreg.engine.fullbatch`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gdreg.engine.mesh import DATA_AXIS, fetch_replicated, pad_with_zero_weights, shard_rows
from gdreg.engine.signatures import BatchFn, PredictFn, PyTree


def flip_averaged(predict_fn: PredictFn) -> PredictFn:
    """Test-time augmentation: log of the mean softmax over the image and its mirror image."""

    def predict(params, model_state, inputs):
        probs = jax.nn.softmax(predict_fn(params, model_state, inputs)) + jax.nn.softmax(
            predict_fn(params, model_state, inputs[:, :, ::-1, :])
        )
        return jnp.log(probs / 2)

    return predict


class Evaluator:
    """Mean cross-entropy and accuracy of ``predict_fn`` over images ``0 .. num_images-1``."""

    def __init__(
        self, predict_fn: PredictFn, batch_fn: BatchFn, *, mesh: Mesh, batch_size: int
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.predict_fn = predict_fn
        self.batch_fn = batch_fn
        self.mesh = mesh
        self.batch_size = batch_size
        self.num_devices = mesh.devices.size
        shard = P(DATA_AXIS)
        self._batch = jax.jit(
            jax.shard_map(
                self._batch_body,
                mesh=mesh,
                in_specs=(shard, P(), P(), P(), shard, shard, P()),
                out_specs=shard,
                check_vma=False,
            ),
            donate_argnums=0,
        )
        self._zeros = jax.jit(
            lambda: jnp.zeros((self.num_devices, 3), jnp.float32),
            out_shardings=NamedSharding(mesh, shard),
        )
        self._total = jax.jit(lambda sums: jnp.sum(sums, axis=0))

    def _batch_body(self, sums, params, model_state, data, indices, weights, index):
        # indices, weights: this device's [batches, batch_size]; sums: [1, 3]
        ids = jax.lax.dynamic_index_in_dim(indices, index, keepdims=False)
        mask = jax.lax.dynamic_index_in_dim(weights, index, keepdims=False)
        inputs, labels = self.batch_fn(data, ids, jnp.int32(0))
        logits = self.predict_fn(params, model_state, inputs).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        batch = jnp.stack([jnp.sum(mask * losses), jnp.sum(mask * correct), jnp.sum(mask)])
        return sums + batch[None]

    def __call__(
        self, params: PyTree, model_state: PyTree, data: PyTree, num_images: int
    ) -> dict[str, float]:
        """Returns {"loss", "accuracy"} over the first ``num_images`` images of ``data``.

        A ``batch_size`` beyond one device's share of the images is cut to that share: the
        rest would be zero-weight padding, allocated for nothing (``eval.batch_size=10**9``).
        """
        batch_size = min(self.batch_size, max(1, -(-num_images // self.num_devices)))
        unit = self.num_devices * batch_size
        indices, weights = pad_with_zero_weights(np.arange(num_images, dtype=np.int32), unit)
        padded = indices.shape[0]
        shape = (padded // batch_size, batch_size)
        indices = shard_rows(indices.reshape(shape), self.mesh)
        weights = shard_rows(weights.reshape(shape), self.mesh)
        sums = self._zeros()
        for index in range(padded // unit):
            sums = self._batch(sums, params, model_state, data, indices, weights, jnp.int32(index))
        loss_sum, correct, count = fetch_replicated(self._total(sums))
        return {"loss": float(loss_sum / count), "accuracy": float(correct / count)}
