"""Issue 25: the penalty in other people's code is right by default, or stops with a clear error.

One test (or one parametrized case) per case of the issue: either the penalized gradient equals
``g + strength * lr / 4 * H g`` with ``H`` the explicit float64 Hessian (``jax.hessian`` of the
flattened parameters), or gdreg raises one error that names the fix.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from explicit_hessian import assert_tree_close, penalized_reference, tanh_mlp_problem
from flax import nnx
from flax.training import dynamic_scale as dynamic_scale_lib
from flax.training import train_state
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gdreg

STRENGTH, LR = 0.5, 0.3
MISMATCH = "differs from the incoming gradient"


def _closed_form(loss_of_params, params, strength=STRENGTH, lr=LR):
    return penalized_reference(loss_of_params, params, strength=strength, lr=lr)


def _relative(a, b):
    fa, fb = (
        ravel_pytree(jax.tree.map(np.asarray, a))[0],
        ravel_pytree(jax.tree.map(np.asarray, b))[0],
    )
    return float(np.linalg.norm(np.asarray(fa) - np.asarray(fb)) / np.linalg.norm(np.asarray(fb)))


# --- data parallel: a forgotten axis_name -------------------------------------------------------


def _pmapped(f, x, y, params):
    per_device = (x.reshape(4, -1, x.shape[-1]), y.reshape(4, -1, y.shape[-1]))
    return jax.pmap(f, axis_name="batch", in_axes=(None, 0, 0), devices=jax.devices()[:4])(
        params, *per_device
    )


def test_pmap_without_axis_name_is_refused_and_with_it_a_second_pmean_is_harmless(x64):
    """Flax's ImageNet train_step: pmap over 'batch', ``grads = lax.pmean(grads, 'batch')``."""
    loss_fn, params, x, y = tanh_mlp_problem()

    def train_step(params, xb, yb, axis_name):
        grad_fn = gdreg.value_and_penalized_grad(
            loss_fn, strength=STRENGTH, learning_rate=LR, axis_name=axis_name
        )
        _, grads = grad_fn(params, xb, yb)
        return jax.lax.pmean(grads, "batch")  # the example's own mean, kept

    with pytest.raises(ValueError, match="axis_name='batch'"):
        _pmapped(functools.partial(train_step, axis_name=None), x, y, params)
    # Each device's own penalty, averaged afterwards (what check=False allows on purpose): not
    # the penalty of the whole batch.
    local = gdreg.value_and_penalized_grad(loss_fn, learning_rate=LR, check=False)
    grads = _pmapped(lambda p, xb, yb: jax.lax.pmean(local(p, xb, yb)[1], "batch"), x, y, params)
    wrong = jax.tree.map(lambda g: g[0], grads)
    assert _relative(wrong, _closed_form(lambda p: loss_fn(p, x, y), params)) > 1e-3
    grads = _pmapped(functools.partial(train_step, axis_name="batch"), x, y, params)
    expected = _closed_form(lambda p: loss_fn(p, x, y), params)
    for device in range(4):  # every device holds the whole batch's penalized gradient
        assert_tree_close(jax.tree.map(lambda g, d=device: g[d], grads), expected, rtol=1e-10)


def test_shard_map_without_axis_name_is_refused_unless_the_loss_is_the_global_mean(x64):
    loss_fn, params, x, y = tanh_mlp_problem()
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    xs, ys = jax.device_put((x, y), NamedSharding(mesh, P("data")))

    def run(loss, **kwargs):
        f = gdreg.value_and_penalized_grad(loss, strength=STRENGTH, learning_rate=LR, **kwargs)
        sharded = jax.shard_map(
            f, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P())
        )
        return jax.jit(sharded)(params, xs, ys)[1]

    with pytest.raises(ValueError, match="varies over the mesh axis 'data'"):
        run(loss_fn)
    expected = _closed_form(lambda p: loss_fn(p, x, y), params)
    assert_tree_close(run(loss_fn, axis_name="data"), expected, rtol=1e-10)
    # A loss that is already the mean over the devices is the whole batch's loss: right as is.
    global_mean = lambda p, xb, yb: jax.lax.pmean(loss_fn(p, xb, yb), "data")  # noqa: E731
    assert_tree_close(run(global_mean), expected, rtol=1e-10)


# --- the optax transform: misuse caught by the default check ------------------------------------


def _linear_problem():
    rng = np.random.default_rng(5)
    params = {"w": rng.standard_normal((3, 2)), "b": np.zeros(2)}
    batches = [(rng.standard_normal((8, 3)), rng.standard_normal((8, 2))) for _ in range(2)]

    def loss_fn(p, xb, yb):
        return jnp.mean(jnp.tanh(xb @ p["w"] + p["b"] - yb) ** 2)

    return loss_fn, params, batches


def _misuse(case, method):
    loss_fn, params, [(x, y), (x2, y2)] = _linear_problem()
    grad_fn = jax.grad(lambda p: loss_fn(p, x, y))
    penalty = gdreg.gradient_norm_penalty(learning_rate=LR, method=method)  # default check
    cases = {
        "clipping before": (optax.chain(optax.clip_by_global_norm(1e-2), penalty), grad_fn),
        "weight decay before": (optax.chain(optax.add_decayed_weights(5e-2), penalty), grad_fn),
        "after the optimizer": (optax.chain(optax.sgd(LR, momentum=0.9), penalty), grad_fn),
        "another batch": (penalty, jax.grad(lambda p: loss_fn(p, x2, y2))),
    }
    tx, penalty_grad_fn = cases[case]
    return tx, penalty_grad_fn, params, grad_fn(params)


MISUSES = ["clipping before", "weight decay before", "after the optimizer", "another batch"]


@pytest.mark.parametrize("method", ["forward", "jvp"])
@pytest.mark.parametrize("case", MISUSES)
def test_transform_misuse_stops_at_the_first_update_by_default(x64, case, method):
    tx, penalty_grad_fn, params, grads = _misuse(case, method)
    with pytest.raises(ValueError, match=MISMATCH):
        tx.update(grads, tx.init(params), params, penalty_grad_fn=penalty_grad_fn)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, penalty_grad_fn=penalty_grad_fn))
    with pytest.raises(jax.errors.JaxRuntimeError, match=MISMATCH):
        jax.block_until_ready(update(grads, tx.init(params), params))


def test_transform_inside_multisteps_stops_at_its_first_update(x64):
    loss_fn, params, batches = _linear_problem()
    accumulate = optax.MultiSteps(gdreg.gradient_norm_penalty(learning_rate=LR), every_k_schedule=2)
    state = accumulate.init(params)
    # The inner update runs at the second microbatch, on the mean of both gradients.
    with pytest.raises(jax.errors.JaxRuntimeError, match=MISMATCH):
        for x, y in batches:
            grad_fn = jax.grad(lambda p, x=x, y=y: loss_fn(p, x, y))
            _, state = accumulate.update(grad_fn(params), state, params, penalty_grad_fn=grad_fn)


class _NnxDropoutNet(nnx.Module):
    def __init__(self, rngs):
        kwargs = {"dtype": jnp.float64, "param_dtype": jnp.float64, "rngs": rngs}
        self.hidden = nnx.Linear(3, 6, **kwargs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(6, 2, **kwargs)

    def __call__(self, x):
        return self.out(self.dropout(jnp.tanh(self.hidden(x))))


@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")
def test_nnx_penalty_grad_fn_with_other_dropout_masks_stops_by_default(x64):
    _, _, x, y = tanh_mlp_problem()
    model = _NnxDropoutNet(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(
        model,
        optax.chain(gdreg.gradient_norm_penalty(learning_rate=LR), optax.sgd(LR)),
        wrt=nnx.Param,
    )

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    grads = nnx.grad(loss)(model)

    def careless_grad_fn(p):  # built after nnx.grad: the next dropout masks
        nnx.update(model, p)
        return nnx.grad(loss)(model)

    with pytest.raises(ValueError, match="dropout masks"):
        optimizer.update(model, grads, penalty_grad_fn=careless_grad_fn)


@pytest.mark.parametrize("method", ["forward", "central", "jvp"])
def test_default_check_costs_one_gradient_per_run(x64, method):
    """Right use passes; the check's evaluation happens at the first update only (for "jvp" it
    reuses the product's own pass), and the result is the explicit-Hessian one."""
    loss_fn, params, [(x, y), _] = _linear_problem()
    calls = []

    def grad_fn(p):
        calls.append(1)
        return jax.grad(loss_fn)(p, x, y)

    tx = gdreg.gradient_norm_penalty(learning_rate=LR, strength=STRENGTH, method=method, eps=1e-6)
    state = tx.init(params)
    per_update = {"forward": 1, "central": 2, "jvp": 1}[method]
    for step in range(3):
        calls.clear()
        out, state = tx.update(
            jax.grad(loss_fn)(params, x, y), state, params, penalty_grad_fn=grad_fn
        )
        extra = 1 if step == 0 and method != "jvp" else 0
        assert len(calls) == per_update + extra, (step, len(calls))
    rtol = 1e-10 if method == "jvp" else 1e-4
    assert_tree_close(out, _closed_form(lambda p: loss_fn(p, x, y), params), rtol=rtol)


def test_engine_update_keyword_switches_the_check_off():
    loss_fn, params, [(x, y), (x2, y2)] = _linear_problem()
    tx = gdreg.gradient_norm_penalty(learning_rate=LR)
    other_batch = jax.grad(lambda p: loss_fn(p, x2, y2))
    grads = jax.grad(loss_fn)(params, x, y)
    tx.update(grads, tx.init(params), params, penalty_grad_fn=other_batch, penalty_check=False)
    with pytest.raises(ValueError, match="check must be"):
        gdreg.gradient_norm_penalty(learning_rate=LR, check="sometimes")


# --- the learning rate ------------------------------------------------------------------------


def test_a_rate_that_moves_at_run_time_is_passed_at_each_call(x64):
    """inject_hyperparams and reduce_on_plateau change the optimizer's rate inside its state,
    which the drop-in never sees: build with learning_rate=None and pass the current rate."""
    loss_fn, params, x, y = tanh_mlp_problem()
    tx = optax.chain(
        optax.inject_hyperparams(optax.sgd)(learning_rate=LR),
        optax.contrib.reduce_on_plateau(factor=0.5, patience=0),
    )
    opt_state = tx.init(params)
    opt_state[0].hyperparams["learning_rate"] = jnp.asarray(LR / 2)  # as a manual decay would
    opt_state = (opt_state[0], opt_state[1]._replace(scale=jnp.asarray(0.5)))  # a plateau
    value_and_grad = gdreg.value_and_penalized_grad(loss_fn, learning_rate=None)

    @jax.jit
    def step(params, opt_state):
        rate = opt_state[0].hyperparams["learning_rate"] * opt_state[1].scale
        return value_and_grad(params, x, y, learning_rate=rate)[1]

    expected = _closed_form(lambda p: loss_fn(p, x, y), params, lr=LR / 4)
    assert_tree_close(step(params, opt_state), expected, rtol=1e-10)


def test_warmup_from_zero_is_legal_and_negative_rates_fail_eagerly_and_under_jit(x64):
    """Flax's ImageNet schedule starts at 0: no penalty at step 0, eagerly and under jit alike."""
    loss_fn, params, x, y = tanh_mlp_problem()
    warmup = optax.linear_schedule(0.0, LR, transition_steps=4)
    f = gdreg.value_and_penalized_grad(loss_fn, learning_rate=warmup)
    plain = jax.grad(loss_fn)(params, x, y)
    assert_tree_close(f(params, x, y, step=0)[1], plain, rtol=1e-14)
    assert_tree_close(jax.jit(f)(params, x, y, step=0)[1], plain, rtol=1e-14)
    assert_tree_close(
        jax.jit(f)(params, x, y, step=4)[1],
        _closed_form(lambda p: loss_fn(p, x, y), params),
        rtol=1e-10,
    )
    gdreg.gradient_norm_penalty(learning_rate=0.0)  # legal: the identity

    at_call = gdreg.value_and_penalized_grad(loss_fn, learning_rate=None)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="learning_rate must be finite and >= 0"):
            at_call(params, x, y, learning_rate=bad)
        with pytest.raises(
            jax.errors.JaxRuntimeError, match="learning_rate must be finite and >= 0"
        ):
            jax.block_until_ready(jax.jit(at_call)(params, x, y, learning_rate=bad))
    negative = optax.linear_schedule(0.1, -0.1, transition_steps=2)
    tx = gdreg.gradient_norm_penalty(learning_rate=negative, method="jvp")
    grad_fn = jax.grad(lambda p: loss_fn(p, x, y))
    update = jax.jit(lambda s: tx.update(grad_fn(params), s, params, penalty_grad_fn=grad_fn))
    state = tx.init(params)._replace(count=jnp.asarray(2, jnp.int32))
    with pytest.raises(jax.errors.JaxRuntimeError, match="learning_rate must be finite and >= 0"):
        jax.block_until_ready(update(state))


# --- NNX: fine-tuning a subset, rngs at call time -----------------------------------------------


class _TwoLayers(nnx.Module):
    def __init__(self, rngs):
        kwargs = {"dtype": jnp.float64, "param_dtype": jnp.float64, "rngs": rngs}
        self.body = nnx.Linear(3, 6, **kwargs)
        self.head = nnx.Linear(6, 2, **kwargs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.body(x)))


def test_nnx_fine_tuning_one_layer_penalizes_the_trained_layer_only(x64):
    _, _, x, y = tanh_mlp_problem()
    head = nnx.All(nnx.Param, nnx.PathContains("head"))

    def loss_fn(model, xb, yb):
        return jnp.mean((model(xb) - yb) ** 2)

    model = _TwoLayers(nnx.Rngs(0))
    graphdef, trained, rest = nnx.split(model, head, ...)

    def loss_of_head(p):
        return loss_fn(nnx.merge(graphdef, p, rest, copy=True), x, y)

    expected = _closed_form(loss_of_head, nnx.to_pure_dict(trained))
    for kwargs in ({"wrt": head}, {"argnums": nnx.DiffState(0, head)}):
        f = gdreg.nnx_value_and_penalized_grad(loss_fn, learning_rate=LR, **kwargs)
        _, grads = f(nnx.clone(model), x, y)
        assert_tree_close(nnx.to_pure_dict(grads), expected, rtol=1e-10)
    everything = gdreg.nnx_value_and_penalized_grad(loss_fn, learning_rate=LR)
    _, grads = everything(nnx.clone(model), x, y)
    # What nnx.Optimizer(wrt=head) would keep of a penalty over all parameters: another one.
    assert _relative(nnx.to_pure_dict(nnx.state(grads, head)), expected) > 1e-3
    with pytest.raises(ValueError, match="first argument, the model"):
        gdreg.nnx_value_and_penalized_grad(loss_fn, learning_rate=LR, argnums=1)


class _TutorialCNN(nnx.Module):
    """The NNX MNIST tutorial's shape, small: dropout takes ``rngs`` at call time."""

    def __init__(self, *, rngs):
        kwargs = {"dtype": jnp.float64, "param_dtype": jnp.float64}
        self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs, **kwargs)
        self.norm = nnx.BatchNorm(4, rngs=rngs, **kwargs)
        self.dropout = nnx.Dropout(rate=0.25)
        self.out = nnx.Linear(4 * 16, 3, rngs=rngs, **kwargs)

    def __call__(self, x, rngs=None):
        x = jnp.tanh(self.norm(self.dropout(self.conv(x), rngs=rngs)))
        return self.out(x.reshape(x.shape[0], -1))


@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")
def test_nnx_rngs_passed_at_call_time(x64):
    rng = np.random.default_rng(2)
    batch = {"image": rng.standard_normal((8, 4, 4, 1)), "label": np.arange(8) % 3}

    def loss_fn(model, batch, rngs):
        logits = model(batch["image"], rngs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, logits

    model, rngs = _TutorialCNN(rngs=nnx.Rngs(0)), nnx.Rngs(7)
    before, rngs_before = nnx.clone(model), nnx.clone(rngs)
    grad_fn = gdreg.nnx_value_and_penalized_grad(loss_fn, has_aux=True, learning_rate=LR)
    (loss, _), grads = nnx.jit(lambda m, r, b: grad_fn(m, b, r))(model, rngs, batch)

    # Reference: the same dropout masks and batch statistics, as a function of the parameters.
    graphdef, params, rest = nnx.split((before, rngs_before), nnx.Param, ...)

    def loss_of_params(p):
        m, r = nnx.merge(graphdef, p, rest, copy=True)
        return loss_fn(m, batch, r)[0]

    pure = nnx.to_pure_dict(params)
    expected = _closed_form(lambda p: loss_of_params({0: p, 1: {}}), pure[0])
    assert_tree_close(nnx.to_pure_dict(grads), expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(loss, loss_of_params(pure), rtol=1e-14)
    assert int(rngs.default.count[...]) == int(rngs_before.default.count[...]) + 1  # once


# --- PenaltyTrainState and Flax's TrainState ----------------------------------------------------


def test_penalty_train_state_refuses_a_misspelt_field_and_train_state_points_to_it():
    loss_fn, params, [(x, y), _] = _linear_problem()
    grad_fn = jax.grad(lambda p: loss_fn(p, x, y))
    tx = optax.chain(gdreg.gradient_norm_penalty(learning_rate=LR), optax.sgd(LR))

    class WithStatistics(gdreg.PenaltyTrainState):
        batch_stats: dict

    state = WithStatistics.create(apply_fn=None, params=params, tx=tx, batch_stats={"n": 0})
    with pytest.raises(TypeError, match=r"'batch_stat'.*did you mean 'batch_stats'"):
        state.apply_gradients(grads=grad_fn(params), penalty_grad_fn=grad_fn, batch_stat={"n": 1})
    stepped = state.apply_gradients(
        grads=grad_fn(params), penalty_grad_fn=grad_fn, batch_stats={"n": 1}, update_args={}
    )
    assert stepped.batch_stats == {"n": 1}
    plain = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    with pytest.raises(ValueError, match=r"gdreg\.PenaltyTrainState"):
        plain.apply_gradients(grads=grad_fn(params), penalty_grad_fn=grad_fn)


# --- the default method on ReLU networks; custom_vjp ----------------------------------------------


class _ReluCNN(nn.Module):
    """Flax's Linen MNIST CNN, small: ReLU, zero biases at initialization."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), param_dtype=jnp.float64)(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
        return nn.Dense(3, param_dtype=jnp.float64)(
            nn.relu(nn.Dense(8, param_dtype=jnp.float64)(x))
        )


def test_default_method_is_exact_on_relu_cnn_at_initialization(x64):
    """Zero biases and zero image backgrounds put units exactly on ReLU's kink, where forward
    differences diverge as 1/eps; the default (jvp) is the explicit Hessian's penalty."""
    rng = np.random.default_rng(0)
    images = np.zeros((8, 6, 6, 1))
    images[:, 2:4, 1:5, 0] = rng.uniform(0.5, 1.0, (8, 2, 4))  # a stroke on a zero background
    labels = np.arange(8) % 3
    model = _ReluCNN()
    params = model.init(jax.random.key(0), images)

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

    expected = _closed_form(lambda p: loss_fn(p, images, labels), params)
    _, grads = jax.jit(gdreg.value_and_penalized_grad(loss_fn, learning_rate=LR))(
        params, images, labels
    )
    assert_tree_close(grads, expected, rtol=1e-10, atol=1e-15)
    plain = jax.grad(loss_fn)(params, images, labels)
    exact_term = jax.tree.map(jnp.subtract, expected, plain)
    forward = gdreg.value_and_penalized_grad(loss_fn, learning_rate=LR, method="forward")
    forward_term = jax.tree.map(jnp.subtract, jax.jit(forward)(params, images, labels)[1], plain)
    assert _relative(forward_term, exact_term) > 1.0  # the paper's method: another regularizer


def test_jvp_through_custom_vjp_names_forward_differences(x64):
    """A custom_vjp whose forward rule calls the function itself (a common way to write one):
    JAX has no forward-mode derivative of it, and gdreg says to use finite differences."""

    @jax.custom_vjp
    def smooth(z):
        return jnp.tanh(z)

    smooth.defvjp(lambda z: (smooth(z), z), lambda z, g: (g * (1 - jnp.tanh(z) ** 2),))
    _, params, x, y = tanh_mlp_problem()

    def custom_loss(p, xb, yb):
        return jnp.mean((smooth(xb @ p["params"]["Dense_1"]["kernel"]) - yb[:, :1]) ** 2)

    with pytest.raises(ValueError, match='method="forward"'):
        gdreg.value_and_penalized_grad(custom_loss, learning_rate=LR)(params, x, y)
    _, grads = gdreg.value_and_penalized_grad(
        custom_loss, learning_rate=LR, method="central", eps=1e-4
    )(params, x, y)
    # The reference in reverse mode only (jax.hessian is forward-over-reverse).
    flat, unravel = ravel_pytree(params)
    flat_loss = lambda z: custom_loss(unravel(z), x, y)  # noqa: E731
    g = jax.grad(flat_loss)(flat)
    expected = unravel(g + STRENGTH * LR / 4 * jax.jacrev(jax.grad(flat_loss))(flat) @ g)
    assert_tree_close(grads, expected, rtol=1e-6, atol=1e-12)


# --- DynamicScale (float16 loss scaling) --------------------------------------------------------


def test_with_penalized_gradient_under_dynamic_scale(x64):
    """Flax's ImageNet example's float16 branch: DynamicScale differentiates the loss itself."""
    loss_fn, params, x, y = tanh_mlp_problem()

    def with_aux(p, xb, yb):
        return loss_fn(p, xb, yb), {"targets": jnp.mean(yb)}

    def train_step(params, xb, yb, dynamic_scale):
        grad_fn = dynamic_scale.value_and_grad(
            gdreg.with_penalized_gradient(
                with_aux, learning_rate=LR, has_aux=True, axis_name="batch"
            ),
            has_aux=True,
            axis_name="batch",
        )
        return grad_fn(params, xb, yb)

    scale = dynamic_scale_lib.DynamicScale(scale=2.0**10)
    result = jax.pmap(
        train_step, axis_name="batch", in_axes=(None, 0, 0, None), devices=jax.devices()[:4]
    )(params, x.reshape(4, -1, 3), y.reshape(4, -1, 2), scale)
    expected = _closed_form(lambda p: loss_fn(p, x, y), params)
    # DynamicScale hands back float32 gradients.
    assert_tree_close(jax.tree.map(lambda g: g[0], result.grad), expected, rtol=1e-5)
    assert bool(result.finite[0])
    np.testing.assert_allclose(result.aux[0][0], loss_fn(params, x[:4], y[:4]), rtol=1e-12)


# --- a failed check under jit: the message once, nothing at exit --------------------------------


def test_a_failed_check_under_jit_says_it_once_and_nothing_at_exit():
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np, optax
        from jax.sharding import NamedSharding, PartitionSpec as P
        import gdreg
        mesh = jax.make_mesh((4,), ("batch",))
        x = jax.device_put(np.ones((8, 3), np.float32), NamedSharding(mesh, P("batch")))
        params = {"w": np.full(3, 0.5, np.float32)}
        loss = lambda p, xb: jnp.mean(jnp.tanh(xb @ p["w"]) ** 2)
        tx = optax.chain(optax.clip_by_global_norm(1e-3), gdreg.gradient_norm_penalty(learning_rate=0.1))
        def body(p, xb):
            g = jax.lax.pmean(jax.grad(loss)(p, xb), "batch")
            grad_fn = lambda q: jax.lax.pmean(jax.grad(loss)(q, xb), "batch")
            return tx.update(g, tx.init(p), p, penalty_grad_fn=grad_fn)[0]
        step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("batch")), out_specs=P(),
                                     check_vma=False))
        try:
            jax.block_until_ready(step(params, x))
        except jax.errors.JaxRuntimeError as error:
            print("CAUGHT", str(error).strip().splitlines()[-1][:90])
        """
    )
    environment = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The error's last line is gdreg's message (from a ValueError subclass).
    assert "CAUGHT PenaltyCheckError: gradient_norm_penalty: penalty_grad_fn(params) differs" in (
        result.stdout
    )
    assert "Exception ignored" not in result.stderr, result.stderr[-3000:]
    assert "callback failed" not in result.stderr, result.stderr[-3000:]
