"""Minibatch training in plain JAX with the gradient-norm penalty of Geiping et al. (2022)."""

import jax
import jax.numpy as jnp
import optax

import gdreg


def init(key, sizes=(8, 32, 1)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) / jnp.sqrt(m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def predict(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
    return jnp.mean((predict(params, x) - y) ** 2)


key_x, key_w, key_init = jax.random.split(jax.random.key(0), 3)
x_train = jax.random.normal(key_x, (512, 8))
y_train = jnp.sin(x_train @ jax.random.normal(key_w, (8, 1)) / 3)
params = init(key_init)

epochs, batch_size = 5, 64
schedule = optax.cosine_decay_schedule(0.05, decay_steps=epochs * len(x_train) // batch_size)
# Any optax chain: the gradient it receives already carries the penalty.
tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(schedule, momentum=0.9, nesterov=True))
opt_state = tx.init(params)
# The penalty's size is strength * lr / 8 * ||grad L||^2, with the optimizer's learning rate:
# give the same schedule, and the step at each call.
value_and_grad = gdreg.value_and_penalized_grad(loss_fn, strength=0.5, learning_rate=schedule)


@jax.jit
def train_step(params, opt_state, step, x, y):
    loss, grads = value_and_grad(params, x, y, step=step)  # instead of jax.value_and_grad
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


losses, step = [float(loss_fn(params, x_train, y_train))], 0
print(f"before training: loss {losses[0]:.4f}")
for epoch in range(epochs):
    for start in range(0, len(x_train), batch_size):
        batch = slice(start, start + batch_size)
        params, opt_state, _ = train_step(params, opt_state, step, x_train[batch], y_train[batch])
        step += 1
    losses.append(float(loss_fn(params, x_train, y_train)))
    print(f"epoch {epoch + 1}: loss {losses[-1]:.4f}")
