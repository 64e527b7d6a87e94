"""Data-parallel training with the penalty: each device holds a slice of every batch."""

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gdreg


def predict(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def loss_fn(params, x, y):  # the loss of this device's slice of the batch
    return jnp.mean((predict(params, x) - y) ** 2)


mesh = jax.make_mesh((jax.device_count(),), ("data",))
key_x, key_w, key_1, key_2 = jax.random.split(jax.random.key(0), 4)
x_train = jax.random.normal(key_x, (512, 8))
y_train = jnp.sin(x_train @ jax.random.normal(key_w, (8, 1)) / 3)
params = {"w1": jax.random.normal(key_1, (8, 32)) / 3, "w2": jax.random.normal(key_2, (32, 1)) / 6}
tx = optax.sgd(0.05, momentum=0.9)
opt_state = tx.init(params)
# axis_name: the gradient is averaged over the devices before the penalty's perturbation, so the
# step equals the single-device step on the whole batch.
value_and_grad = gdreg.value_and_penalized_grad(
    loss_fn, strength=0.5, learning_rate=0.05, axis_name="data"
)


@jax.jit
@functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(P(), P(), P("data"), P("data")),
    out_specs=(P(), P(), P()),
)
def train_step(params, opt_state, x, y):
    loss, grads = value_and_grad(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


batch_size = 64  # divisible by the number of devices
losses = []
for epoch in range(5):
    for start in range(0, len(x_train), batch_size):
        batch = (x_train[start : start + batch_size], y_train[start : start + batch_size])
        x, y = jax.device_put(batch, NamedSharding(mesh, P("data")))
        params, opt_state, loss = train_step(params, opt_state, x, y)
    losses.append(float(loss))
    print(f"epoch {epoch + 1}: loss {losses[-1]:.4f}")
