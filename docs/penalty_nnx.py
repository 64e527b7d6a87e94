"""A Flax NNX model with BatchNorm and Dropout, trained with nnx.Optimizer and the penalty."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import gdreg


class Classifier(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


centers = 2.0 * jax.random.normal(jax.random.key(1), (3, 8))
labels = jnp.arange(384) % 3
images = centers[labels] + jax.random.normal(jax.random.key(0), (384, 8))
model = Classifier(nnx.Rngs(0))
learning_rate = 0.05
optimizer = nnx.Optimizer(model, optax.sgd(learning_rate, momentum=0.9), wrt=nnx.Param)
# All passes of one step (the gradient and the penalty's) see the same dropout masks and batch
# statistics; BatchNorm's running averages and the RNG move once per step, as without penalty.
value_and_grad = gdreg.nnx_value_and_penalized_grad(
    loss_fn, strength=0.5, learning_rate=learning_rate
)


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = value_and_grad(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), -1) == y)


losses = []
for epoch in range(4):
    model.train()
    for start in range(0, len(images), 64):
        batch = (images[start : start + 64], labels[start : start + 64])
        loss = train_step(model, optimizer, *batch)
    losses.append(float(loss))
    print(f"epoch {epoch + 1}: loss {losses[-1]:.4f}")
model.eval()
final_accuracy = float(accuracy(model, images, labels))
print(f"training accuracy {final_accuracy:.3f}")
