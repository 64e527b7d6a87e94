"""The training objective of a Flax model as the engine's functions: loss, accuracy, logits.

:func:`make_loss_fn` is the engine's ``loss_fn`` (:data:`gdreg.engine.signatures.LossFn`): the
mean cross-entropy of one block in training mode, BatchNorm on the block's statistics, with the
reference implementation's label smoothing; :func:`make_predict_fn` the evaluator's
``predict_fn`` (evaluation mode). Geiping et al. (ICLR 2022) train with the plain cross-entropy.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gdreg.engine.evaluate import flip_averaged
from gdreg.engine.signatures import LossFn, PredictFn


def loss_and_accuracy(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy of a block's logits (at least float32).

    With ``label_smoothing = s > 0`` the targets are the reference's
    (``LabelSmoothCrossEntropyLoss`` in ``fullbatch/models/modules.py``): ``1 - s`` on the
    label and ``s / (K - 1)`` on each of the other K - 1 classes, i.e. ``optax.smooth_labels``
    with ``alpha = s * K / (K - 1)`` (optax spreads ``alpha`` over all K classes)::

        loss = -(1 - s) * log p_y - s / (K - 1) * sum_{k != y} log p_k
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    num_classes = logits.shape[-1]
    if label_smoothing and num_classes > 1:
        alpha = label_smoothing * num_classes / (num_classes - 1)
        targets = optax.smooth_labels(
            jax.nn.one_hot(labels, num_classes, dtype=logits.dtype), alpha
        )
        loss = optax.softmax_cross_entropy(logits, targets).mean()
    else:
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def make_loss_fn(model: nn.Module, *, label_smoothing: float = 0.0) -> LossFn:
    """Mean cross-entropy of one block in training mode (BatchNorm on the block's statistics),
    with the reference's label smoothing (see :func:`loss_and_accuracy`)."""

    def loss_fn(params, model_state, inputs, labels):
        variables = {"params": params, **model_state}
        if model_state:
            logits, new_state = model.apply(
                variables, inputs, train=True, mutable=list(model_state)
            )
        else:
            logits, new_state = model.apply(variables, inputs, train=True), {}
        loss, accuracy = loss_and_accuracy(logits, labels, label_smoothing)
        return loss, (new_state, {"accuracy": accuracy})

    return loss_fn


def make_predict_fn(model: nn.Module, *, flip_average: bool = False) -> PredictFn:
    """Logits in evaluation mode (BatchNorm on its running statistics), optionally averaged
    with the mirror image's (:func:`gdreg.engine.evaluate.flip_averaged`)."""

    def predict(params, model_state, inputs):
        return model.apply({"params": params, **model_state}, inputs, train=False)

    return flip_averaged(predict) if flip_average else predict
