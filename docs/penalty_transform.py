"""The penalty as an optax transformation, through a Flax TrainState (gdreg.PenaltyTrainState)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gdreg


class Regressor(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(32)(x)))


rng = np.random.default_rng(0)
x_train = rng.standard_normal((512, 8)).astype(np.float32)
y_train = np.sin(x_train @ rng.standard_normal((8, 1)) / 3).astype(np.float32)
model = Regressor()
schedule = optax.cosine_decay_schedule(0.05, decay_steps=40)
tx = optax.chain(
    # First in the chain, on the raw gradient of the batch that penalty_grad_fn differentiates
    # (checked at the first update; "jvp" checks every update for free).
    gdreg.gradient_norm_penalty(learning_rate=schedule, strength=0.5, method="jvp"),
    optax.clip_by_global_norm(1.0),
    optax.sgd(schedule, momentum=0.9),
)
state = gdreg.PenaltyTrainState.create(
    apply_fn=model.apply, params=model.init(jax.random.key(0), x_train[:1]), tx=tx
)


@jax.jit
def train_step(state, x, y):
    def batch_loss(params):
        return jnp.mean((state.apply_fn(params, x) - y) ** 2)

    loss, grads = jax.value_and_grad(batch_loss)(state.params)
    # PenaltyTrainState passes penalty_grad_fn on to tx.update (Flax's TrainState cannot).
    return state.apply_gradients(grads=grads, penalty_grad_fn=jax.grad(batch_loss)), loss


losses = []
for epoch in range(5):
    for start in range(0, len(x_train), 64):
        state, loss = train_step(state, x_train[start : start + 64], y_train[start : start + 64])
    losses.append(float(loss))
    print(f"epoch {epoch + 1}: loss {losses[-1]:.4f}")
