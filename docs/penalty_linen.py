"""A Flax Linen model with BatchNorm, trained through a TrainState with the penalty."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import gdreg


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(nn.relu(x))


class TrainState(train_state.TrainState):
    batch_stats: Any


key_x, key_init = jax.random.split(jax.random.key(0))
centers = 2.0 * jax.random.normal(jax.random.key(1), (3, 8))
labels = jnp.arange(384) % 3
images = centers[labels] + jax.random.normal(key_x, (384, 8))
model = Classifier()
variables = model.init(key_init, images[:2], train=False)
learning_rate = 0.05
state = TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=optax.sgd(learning_rate, momentum=0.9),
)


def loss_fn(params, batch_stats, x, y):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates["batch_stats"]


# has_aux as in jax.value_and_grad: the statistics come from the unperturbed forward pass.
value_and_grad = gdreg.value_and_penalized_grad(
    loss_fn, strength=0.5, learning_rate=learning_rate, has_aux=True
)


@jax.jit
def train_step(state, x, y):
    (loss, batch_stats), grads = value_and_grad(state.params, state.batch_stats, x, y)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss


@jax.jit
def accuracy(state, x, y):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return jnp.mean(jnp.argmax(model.apply(variables, x, train=False), -1) == y)


losses = []
for epoch in range(4):
    for start in range(0, len(images), 64):
        state, loss = train_step(state, images[start : start + 64], labels[start : start + 64])
    losses.append(float(loss))
    print(f"epoch {epoch + 1}: loss {losses[-1]:.4f}")
final_accuracy = float(accuracy(state, images, labels))
print(f"training accuracy {final_accuracy:.3f}")
