"""Flax's Linen MNIST example (google/flax examples/mnist/train.py, Linen version), rebuilt small.

The same loop (a TrainState, a jitted ``apply_model`` that returns the gradient, a jitted
``update_model``, epochs over shuffled batches) on 8x8 synthetic digits: a stroke on a zero
background, as MNIST's images are, so that ReLU units sit on their kink at initialization.
``linen_mnist_penalty.py`` is this file with gdreg's penalty (docs/penalty.md shows the diff).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits import digits
from flax.training import train_state

import gdreg

# The example's configs/default.py, small.
LEARNING_RATE, MOMENTUM = 0.1, 0.9
BATCH_SIZE, NUM_EPOCHS = 32, 4


class CNN(nn.Module):
    """A small CNN."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=8, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(features=32)(x)
        x = nn.relu(x)
        return nn.Dense(features=10)(x)


@jax.jit
def apply_model(state, images, labels):
    """Gradient, loss and accuracy on one batch."""

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, images)
        one_hot = jax.nn.one_hot(labels, 10)
        loss = jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot))
        return loss, logits

    grad_fn = gdreg.value_and_penalized_grad(loss_fn, has_aux=True, learning_rate=LEARNING_RATE)
    (loss, logits), grads = grad_fn(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return grads, loss, accuracy


@jax.jit
def update_model(state, grads):
    return state.apply_gradients(grads=grads)


def train_epoch(state, train_ds, batch_size, rng):
    steps_per_epoch = len(train_ds["image"]) // batch_size
    perms = jax.random.permutation(rng, len(train_ds["image"]))[: steps_per_epoch * batch_size]
    losses, accuracies = [], []
    for perm in perms.reshape((steps_per_epoch, batch_size)):
        grads, loss, accuracy = apply_model(state, train_ds["image"][perm], train_ds["label"][perm])
        state = update_model(state, grads)
        losses.append(loss)
        accuracies.append(accuracy)
    return state, float(np.mean(losses)), float(np.mean(accuracies))


def get_datasets(n_train=512, n_test=256):
    train_images, train_labels = digits(n_train, seed=0)
    test_images, test_labels = digits(n_test, seed=1)
    return (
        {"image": train_images, "label": train_labels},
        {"image": test_images, "label": test_labels},
    )


def create_train_state(rng):
    cnn = CNN()
    params = cnn.init(rng, jnp.ones([1, 8, 8, 1]))["params"]
    tx = optax.sgd(LEARNING_RATE, MOMENTUM)
    return train_state.TrainState.create(apply_fn=cnn.apply, params=params, tx=tx)


def train_and_evaluate():
    train_ds, test_ds = get_datasets()
    rng, init_rng = jax.random.split(jax.random.key(0))
    state = create_train_state(init_rng)
    history = []
    for epoch in range(1, NUM_EPOCHS + 1):
        rng, input_rng = jax.random.split(rng)
        state, train_loss, train_accuracy = train_epoch(state, train_ds, BATCH_SIZE, input_rng)
        _, test_loss, test_accuracy = apply_model(state, test_ds["image"], test_ds["label"])
        history.append((train_loss, train_accuracy, float(test_loss), float(test_accuracy)))
        print(f"epoch {epoch}: train loss {train_loss:.4f}, test accuracy {test_accuracy:.3f}")
    return state, history


if __name__ == "__main__":
    state, history = train_and_evaluate()
