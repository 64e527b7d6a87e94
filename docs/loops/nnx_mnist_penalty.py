"""Flax's NNX MNIST tutorial (google/flax docs_nnx/mnist_tutorial), rebuilt small.

The same loop: a CNN with BatchNorm and Dropout whose ``rngs`` come at call time,
``nnx.view`` for the training and evaluation modes, ``nnx.Optimizer`` with AdamW, an
``nnx.MultiMetric``, and ``nnx.jit`` steps that update everything in place, on 8x8 synthetic
digits. ``nnx_mnist_penalty.py`` is this file with gdreg's penalty (docs/penalty.md shows the
diff).
"""

from functools import partial

import numpy as np
import optax
from digits import digits
from flax import nnx

import gdreg

train_steps, eval_every, batch_size = 60, 20, 32


def make_batches(images, labels, batch_size, seed=0):
    order = np.random.default_rng(seed).permutation(len(labels))
    for i in range(0, len(order) - batch_size + 1, batch_size):
        take = order[i : i + batch_size]
        yield {"image": images[take], "label": labels[take]}


train_images, train_labels = digits(2048, seed=0)
test_images, test_labels = digits(256, seed=1)


class CNN(nnx.Module):
    """A small CNN."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(8, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=0.025)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(128, 32, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=0.025)
        self.linear2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x, rngs: nnx.Rngs | None = None):
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
        return self.linear2(x)


model = CNN(rngs=nnx.Rngs(0))
learning_rate = 0.005
momentum = 0.9
optimizer = nnx.Optimizer(model, optax.adamw(learning_rate, momentum), wrt=nnx.Param)
metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))


def loss_fn(model: CNN, batch, rngs: nnx.Rngs | None = None):
    logits = model(batch["image"], rngs)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits=logits, labels=batch["label"]
    ).mean()
    return loss, logits


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, rngs, batch):
    """Train for a single step."""
    grad_fn = gdreg.nnx_value_and_penalized_grad(loss_fn, has_aux=True, learning_rate=learning_rate)
    (loss, logits), grads = grad_fn(model, batch, rngs)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])  # In-place updates.
    optimizer.update(model, grads)  # In-place updates.


@nnx.jit
def eval_step(model: CNN, metrics: nnx.MultiMetric, batch):
    loss, logits = loss_fn(model, batch)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])  # In-place updates.


train_model = nnx.view(model, deterministic=False, use_running_average=False)
eval_model = nnx.view(model, deterministic=True, use_running_average=True)
history = {"train_loss": [], "test_accuracy": []}
rngs = nnx.Rngs(0)
for step, batch in enumerate(make_batches(train_images, train_labels, batch_size)):
    if step >= train_steps:
        break
    train_step(train_model, optimizer, metrics, rngs, batch)
    if step > 0 and (step % eval_every == 0 or step == train_steps - 1):
        history["train_loss"].append(float(metrics.compute()["loss"]))
        metrics.reset()
        for test_batch in make_batches(test_images, test_labels, batch_size):
            eval_step(eval_model, metrics, test_batch)
        history["test_accuracy"].append(float(metrics.compute()["accuracy"]))
        metrics.reset()
        print(
            f"step {step}: train loss {history['train_loss'][-1]:.4f}, "
            f"test accuracy {history['test_accuracy'][-1]:.3f}"
        )
