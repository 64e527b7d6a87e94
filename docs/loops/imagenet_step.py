"""Flax's ImageNet example (google/flax examples/imagenet/train.py), rebuilt small.

The same ``train_step``: ``jax.pmap`` over the local devices with ``axis_name="batch"``,
cross-replica BatchNorm (``axis_name="batch"`` in the model), weight decay inside the loss, a
warmup from 0 followed by a cosine decay, Nesterov momentum, ``lax.pmean`` of the gradient, and
the ``DynamicScale`` branch of half precision (float16 loss scaling). A tiny ResNet on 8x8
synthetic images stands in for ResNet-50 on ImageNet. ``imagenet_step_penalty.py`` is this
file with gdreg's penalty (docs/penalty.md shows the diff).
"""

import functools
from types import SimpleNamespace
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import dynamic_scale as dynamic_scale_lib
from flax.training import train_state
from jax import lax

NUM_CLASSES = 4
CONFIG = SimpleNamespace(
    learning_rate=0.1,
    momentum=0.9,
    batch_size=64,
    num_epochs=6,
    warmup_epochs=1,
    half_precision=False,
)


class ResNet(nn.Module):
    """A one-block ResNet V1.5: convolution, BatchNorm over all devices, ReLU."""

    num_classes: int
    dtype: Any = jnp.float32
    axis_name: str | None = "batch"

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            axis_name=self.axis_name,
        )
        x = nn.relu(norm(name="bn_init")(conv(8, (3, 3), name="conv_init")(x)))
        y = nn.relu(norm()(conv(8, (3, 3))(x)))
        y = norm(scale_init=nn.initializers.zeros_init())(conv(8, (3, 3))(y))
        x = nn.relu(x + y)
        x = jnp.mean(x, axis=(1, 2))
        return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype)(x), self.dtype)


def create_model(*, half_precision, **kwargs):
    model_dtype = jnp.float16 if half_precision else jnp.float32
    return ResNet(num_classes=NUM_CLASSES, dtype=model_dtype, **kwargs)


def initialized(key, image_size, model):
    variables = jax.jit(model.init)({"params": key}, jnp.ones((1, image_size, image_size, 3)))
    return variables["params"], variables["batch_stats"]


def cross_entropy_loss(logits, labels):
    one_hot_labels = jax.nn.one_hot(labels, num_classes=NUM_CLASSES)
    return jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot_labels))


def compute_metrics(logits, labels):
    metrics = {
        "loss": cross_entropy_loss(logits, labels),
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
    }
    return lax.pmean(metrics, axis_name="batch")


def create_learning_rate_fn(config, base_learning_rate, steps_per_epoch):
    warmup_fn = optax.linear_schedule(
        init_value=0.0,
        end_value=base_learning_rate,
        transition_steps=config.warmup_epochs * steps_per_epoch,
    )
    cosine_epochs = max(config.num_epochs - config.warmup_epochs, 1)
    cosine_fn = optax.cosine_decay_schedule(
        init_value=base_learning_rate, decay_steps=cosine_epochs * steps_per_epoch
    )
    return optax.join_schedules(
        schedules=[warmup_fn, cosine_fn], boundaries=[config.warmup_epochs * steps_per_epoch]
    )


def train_step(state, batch, learning_rate_fn):
    """One step on the devices' slices of the batch."""

    def loss_fn(params):
        logits, new_model_state = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            mutable=["batch_stats"],
        )
        loss = cross_entropy_loss(logits, batch["label"])
        weight_decay = 0.0001
        weight_l2 = sum(jnp.sum(x**2) for x in jax.tree.leaves(params) if x.ndim > 1)
        loss = loss + weight_decay * 0.5 * weight_l2
        return loss, (new_model_state, logits)

    step = state.step
    dynamic_scale = state.dynamic_scale
    lr = learning_rate_fn(step)

    if dynamic_scale:
        grad_fn = dynamic_scale.value_and_grad(loss_fn, has_aux=True, axis_name="batch")
        dynamic_scale, is_fin, aux, grads = grad_fn(state.params)
        # dynamic_scale averages the gradient over the devices itself
    else:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        aux, grads = grad_fn(state.params)
        grads = lax.pmean(grads, axis_name="batch")
    new_model_state, logits = aux[1]
    metrics = compute_metrics(logits, batch["label"])
    metrics["learning_rate"] = lr

    new_state = state.apply_gradients(
        grads=grads, batch_stats=lax.pmean(new_model_state["batch_stats"], "batch")
    )
    if dynamic_scale:
        # Gradients with Inf/NaN: keep the old parameters and optimizer state (skip the step).
        keep = functools.partial(jnp.where, is_fin)
        new_state = new_state.replace(
            opt_state=jax.tree.map(keep, new_state.opt_state, state.opt_state),
            params=jax.tree.map(keep, new_state.params, state.params),
            dynamic_scale=dynamic_scale,
        )
        metrics["scale"] = dynamic_scale.scale
    return new_state, metrics


class TrainState(train_state.TrainState):
    batch_stats: Any
    dynamic_scale: dynamic_scale_lib.DynamicScale


def create_train_state(rng, config, model, image_size, learning_rate_fn):
    dynamic_scale = dynamic_scale_lib.DynamicScale() if config.half_precision else None
    params, batch_stats = initialized(rng, image_size, model)
    tx = optax.sgd(learning_rate=learning_rate_fn, momentum=config.momentum, nesterov=True)
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        batch_stats=batch_stats,
        dynamic_scale=dynamic_scale,
    )


def synthetic_batches(config, steps, image_size=8, seed=0):
    """Batches shaped (devices, per-device batch, ...): class k brightens channel k % 3."""
    rng = np.random.default_rng(seed)
    devices = jax.local_device_count()
    for _ in range(steps):
        labels = rng.integers(0, NUM_CLASSES, config.batch_size)
        images = rng.normal(0, 0.5, (config.batch_size, image_size, image_size, 3))
        images[np.arange(config.batch_size), :, :, labels % 3] += (1.0 + (labels == 3))[
            :, None, None
        ]
        batch = {"image": images.astype(np.float32), "label": labels}
        yield jax.tree.map(lambda x: x.reshape((devices, -1, *x.shape[1:])), batch)


def train_and_evaluate(config, steps_per_epoch=4):
    model = create_model(half_precision=config.half_precision)
    learning_rate_fn = create_learning_rate_fn(config, config.learning_rate, steps_per_epoch)
    state = create_train_state(jax.random.key(0), config, model, 8, learning_rate_fn)
    p_train_step = jax.pmap(
        functools.partial(train_step, learning_rate_fn=learning_rate_fn),
        in_axes=(None, 0),
        out_axes=(None, 0),
        axis_name="batch",
    )
    history = []
    num_steps = config.num_epochs * steps_per_epoch
    for step, batch in enumerate(synthetic_batches(config, num_steps)):
        state, metrics = p_train_step(state, batch)
        if (step + 1) % steps_per_epoch == 0:
            history.append(float(metrics["loss"].mean()))
            print(f"epoch {(step + 1) // steps_per_epoch}: loss {history[-1]:.4f}")
    return state, history


if __name__ == "__main__":
    state, history = train_and_evaluate(CONFIG)
