"""Data-parallel training under jax.pmap, as in Flax's ImageNet example: pass the mapped axis."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gdreg


def predict(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def loss_fn(params, x, y):  # the loss of this device's slice of the batch
    return jnp.mean((predict(params, x) - y) ** 2)


devices = jax.local_device_count()
rng = np.random.default_rng(0)
x_train = rng.standard_normal((512, 8)).astype(np.float32)
y_train = np.sin(x_train @ rng.standard_normal((8, 1)) / 3).astype(np.float32)
params = {
    "w1": (rng.standard_normal((8, 32)) / 3).astype(np.float32),
    "w2": (rng.standard_normal((32, 1)) / 6).astype(np.float32),
}
tx = optax.sgd(0.05, momentum=0.9)
opt_state = tx.init(params)
# axis_name="batch", the pmapped axis: the gradient is averaged over the devices before the
# penalty, so every device computes the single-device step on the whole batch. Without it
# gdreg refuses to run inside pmap: each device would take the penalty of its own slice.
value_and_grad = gdreg.value_and_penalized_grad(
    loss_fn, strength=0.5, learning_rate=0.05, axis_name="batch"
)


@functools.partial(
    jax.pmap, axis_name="batch", in_axes=(None, None, 0, 0), out_axes=(None, None, None)
)
def train_step(params, opt_state, x, y):
    loss, grads = value_and_grad(params, x, y)
    grads = jax.lax.pmean(grads, "batch")  # harmless: every device holds the mean already
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


batch_size = 64  # divisible by the number of devices
losses = []
for epoch in range(5):
    for start in range(0, len(x_train), batch_size):
        x, y = x_train[start : start + batch_size], y_train[start : start + batch_size]
        x, y = x.reshape(devices, -1, 8), y.reshape(devices, -1, 1)  # a slice per device
        params, opt_state, loss = train_step(params, opt_state, x, y)
    losses.append(float(loss))
    print(f"epoch {epoch + 1}: loss {losses[-1]:.4f}")
