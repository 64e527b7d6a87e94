"""Minibatch training of a Flax model with the gradient-norm penalty of Geiping et al. (2022)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import gdreg


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.relu(nn.Dense(32)(x)))


key_x, key_w, key_init = jax.random.split(jax.random.key(0), 3)
x_train = jax.random.normal(key_x, (512, 8))
y_train = jnp.sin(x_train @ jax.random.normal(key_w, (8, 1)) / 3)
model = MLP()
params = model.init(key_init, x_train[:1])


def loss_fn(params, x, y):
    return jnp.mean((model.apply(params, x) - y) ** 2)


epochs, batch_size = 5, 64
# The penalty needs the optimizer's learning rate (a float, or the same schedule) and goes first
# in the chain, where it still sees the raw gradient of the batch.
schedule = optax.cosine_decay_schedule(0.05, decay_steps=epochs * len(x_train) // batch_size)
tx = optax.chain(
    gdreg.gradient_norm_penalty(strength=0.5, learning_rate=schedule),
    optax.sgd(schedule, momentum=0.9, nesterov=True),
)
opt_state = tx.init(params)


@jax.jit
def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    # grad_fn: the gradient of the same loss on the same batch, at any parameters.
    grad_fn = jax.grad(lambda p: loss_fn(p, x, y))
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state, loss


losses = [float(loss_fn(params, x_train, y_train))]
print(f"before training: loss {losses[0]:.4f}")
for epoch in range(epochs):
    for start in range(0, len(x_train), batch_size):
        batch = slice(start, start + batch_size)
        params, opt_state, _ = train_step(params, opt_state, x_train[batch], y_train[batch])
    losses.append(float(loss_fn(params, x_train, y_train)))
    print(f"epoch {epoch + 1}: loss {losses[-1]:.4f}")
