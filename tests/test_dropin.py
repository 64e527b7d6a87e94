"""The penalty in other people's code: value_and_penalized_grad, the Flax helpers, optax interplay.

Every penalized gradient is checked against an independent float64 reference,
g + strength * lr / 4 * H g with H from jax.hessian, on small models with smooth activations.
"""

from __future__ import annotations

import functools
import os
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from explicit_hessian import assert_tree_close, penalized_reference, regression, tanh_mlp_problem
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gdreg

DOCS = Path(__file__).resolve().parents[1] / "docs"
STRENGTH, LR = 0.5, 0.3


def _closed_form(loss_of_params, params, strength=STRENGTH, lr=LR):
    return penalized_reference(loss_of_params, params, strength=strength, lr=lr)


# --- value_and_penalized_grad ---------------------------------------------------------------


@pytest.mark.parametrize(("method", "eps", "rtol"), [("jvp", 1e-2, 1e-11), ("central", 1e-4, 1e-7)])
def test_value_and_penalized_grad_equals_explicit_hessian(x64, method, eps, rtol):
    loss_fn, params, x, y = tanh_mlp_problem()
    f = gdreg.value_and_penalized_grad(
        loss_fn, strength=STRENGTH, learning_rate=LR, method=method, eps=eps
    )
    value, grads = jax.jit(f)(params, x, y)
    np.testing.assert_allclose(value, loss_fn(params, x, y), rtol=1e-14)
    assert_tree_close(grads, _closed_form(lambda p: loss_fn(p, x, y), params), rtol=rtol)


def test_forward_differences_converge_to_the_exact_penalty(x64):
    loss_fn, params, x, y = tanh_mlp_problem()
    expected = _closed_form(lambda p: loss_fn(p, x, y), params)
    g = jax.grad(loss_fn)(params, x, y)
    errors = []
    for eps in (1e-3, 1e-4):
        f = gdreg.value_and_penalized_grad(
            loss_fn, strength=STRENGTH, learning_rate=LR, method="forward", eps=eps
        )
        added = jax.tree.map(jnp.subtract, f(params, x, y)[1], g)
        wanted = jax.tree.map(jnp.subtract, expected, g)
        flat_added, flat_wanted = ravel_pytree(added)[0], ravel_pytree(wanted)[0]
        errors.append(
            float(jnp.linalg.norm(flat_added - flat_wanted) / jnp.linalg.norm(flat_wanted))
        )
    # First order in eps: ten times smaller step, about ten times smaller error.
    assert errors[1] < 2e-3 and 5 < errors[0] / errors[1] < 20


def test_schedules_aux_and_learning_rate_at_call_time(x64):
    loss_fn, params, x, y = tanh_mlp_problem()

    def with_aux(p, xb, yb):
        return loss_fn(p, xb, yb), {"mean_target": jnp.mean(yb)}

    schedule = optax.linear_schedule(0.4, 0.1, transition_steps=3)
    strengths = optax.linear_schedule(1.0, 0.25, transition_steps=3)
    scheduled = gdreg.value_and_penalized_grad(
        with_aux, strength=strengths, learning_rate=schedule, method="jvp", has_aux=True
    )
    at_call = gdreg.value_and_penalized_grad(
        loss_fn, strength=0.5, learning_rate=None, method="jvp"
    )
    for step in (0, 2):
        (_, aux), grads = scheduled(params, x, y, step=step)
        np.testing.assert_allclose(aux["mean_target"], np.mean(y))
        expected = _closed_form(
            lambda p: loss_fn(p, x, y), params, strength=strengths(step), lr=schedule(step)
        )
        assert_tree_close(grads, expected, rtol=1e-11)
    _, grads = at_call(params, x, y, learning_rate=0.2)
    assert_tree_close(grads, _closed_form(lambda p: loss_fn(p, x, y), params, lr=0.2), rtol=1e-11)

    with pytest.raises(ValueError, match="step"):
        scheduled(params, x, y)
    with pytest.raises(ValueError, match="learning_rate is required"):
        at_call(params, x, y)
    with pytest.raises(ValueError, match="learning_rate was given"):
        scheduled(params, x, y, step=0, learning_rate=0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        at_call(params, x, y, learning_rate=-0.1)
    for bad in ({"learning_rate": -1e-3}, {"learning_rate": 0.1, "strength": -1.0}):
        with pytest.raises(ValueError, match=next(reversed(bad))):
            gdreg.value_and_penalized_grad(loss_fn, **bad)
    with pytest.raises(TypeError, match="learning_rate"):
        gdreg.value_and_penalized_grad(loss_fn)  # no silent default
    with pytest.raises(ValueError, match="loss_fn takes step"):
        gdreg.value_and_penalized_grad(lambda p, x, step: p, learning_rate=LR)


def test_integer_leaves_pass_through():
    params = {"w": jnp.array([1.0, -2.0, 0.5]), "power": jnp.int32(2)}
    x = jnp.array([0.5, 1.0, 2.0])

    def loss_fn(p, xb):
        return jnp.sum((xb * p["w"]) ** p["power"])

    _, grads = gdreg.value_and_penalized_grad(loss_fn, learning_rate=LR, method="jvp")(params, x)
    assert grads["power"].dtype == jax.dtypes.float0
    # L = sum (x w)^2: g = 2 x^2 w, H = diag(2 x^2).
    g = 2 * x**2 * params["w"]
    np.testing.assert_allclose(grads["w"], g + STRENGTH * LR / 4 * 2 * x**2 * g, rtol=1e-6)
    tx = gdreg.gradient_norm_penalty(learning_rate=LR, method="jvp")
    raw = jax.grad(loss_fn, allow_int=True)(params, x)
    out, _ = tx.update(
        raw,
        tx.init(params),
        params,
        penalty_grad_fn=lambda p: jax.grad(loss_fn, allow_int=True)(p, x),
    )
    np.testing.assert_allclose(out["w"], grads["w"], rtol=1e-6)
    assert out["power"].dtype == jax.dtypes.float0


# --- data parallel ----------------------------------------------------------------------------


@functools.cache
def _data_parallel_results(method):
    """One penalized step over 4 host devices (shard_map with and without varying-axes checks,
    and the transform) and on one device, float32."""
    loss_fn, params, x, y = tanh_mlp_problem(np.float32)
    mesh = jax.make_mesh((4,), ("batch",), devices=jax.devices()[:4])
    x_sharded, y_sharded = jax.device_put((x, y), NamedSharding(mesh, P("batch")))
    f = gdreg.value_and_penalized_grad(
        loss_fn, strength=STRENGTH, learning_rate=LR, method=method, axis_name="batch"
    )
    tx = gdreg.gradient_norm_penalty(
        strength=STRENGTH, learning_rate=LR, method=method, axis_name="batch", check=True
    )

    def with_transform(p, xb, yb):
        g = jax.lax.pmean(
            jax.grad(loss_fn)(jax.lax.pcast(p, "batch", to="varying"), xb, yb), "batch"
        )
        return tx.update(g, tx.init(p), p, penalty_grad_fn=lambda q: jax.grad(loss_fn)(q, xb, yb))[
            0
        ]

    results = {}
    for name, body, check_vma in [
        ("checked", f, True),
        ("unchecked", f, False),
        ("transform", with_transform, True),
    ]:
        out_specs = P() if name == "transform" else (P(), P())
        sharded = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P("batch"), P("batch")),
            out_specs=out_specs,
            check_vma=check_vma,
        )
        results[name] = jax.jit(sharded)(params, x_sharded, y_sharded)
    per_device = (x.reshape(4, -1, x.shape[-1]), y.reshape(4, -1, y.shape[-1]))
    pmapped = jax.pmap(f, axis_name="batch", in_axes=(None, 0, 0), devices=jax.devices()[:4])
    results["pmap"] = jax.tree.map(lambda leaf: leaf[0], pmapped(params, *per_device))
    single = gdreg.value_and_penalized_grad(
        loss_fn, strength=STRENGTH, learning_rate=LR, method=method
    )
    results["single"] = jax.jit(single)(params, x, y)
    return results


@pytest.mark.parametrize("method", ["jvp", "forward"])
def test_data_parallel_equals_single_device(method):
    results = _data_parallel_results(method)
    value, grads = results["single"]
    # jvp: float32 summation order only. forward: the finite difference divides that rounding
    # by eps_n (about 1e-2 / ||g||), hence the looser bound.
    rtol = 1e-5 if method == "jvp" else 2e-3
    for name in ("checked", "unchecked", "pmap"):
        np.testing.assert_allclose(results[name][0], value, rtol=1e-6)
        assert_tree_close(results[name][1], grads, rtol=rtol, atol=1e-7)
    assert_tree_close(results["transform"], grads, rtol=rtol, atol=1e-7)


def test_a_loss_averaged_over_devices_is_refused():
    loss_fn, params, x, y = tanh_mlp_problem(np.float32)
    mesh = jax.make_mesh((4,), ("batch",), devices=jax.devices()[:4])
    x_sharded, y_sharded = jax.device_put((x, y), NamedSharding(mesh, P("batch")))

    def averaged_loss(p, xb, yb):  # would make the gradient 4 times too small
        return jax.lax.pmean(loss_fn(p, xb, yb), "batch")

    f = gdreg.value_and_penalized_grad(averaged_loss, learning_rate=LR, axis_name="batch")
    sharded = jax.shard_map(
        f, mesh=mesh, in_specs=(P(), P("batch"), P("batch")), out_specs=(P(), P())
    )
    with pytest.raises(ValueError, match="already reduced over axis_name='batch'"):
        jax.jit(sharded)(params, x_sharded, y_sharded)


@pytest.mark.parametrize("snippet", ["penalty_data_parallel", "penalty_pmap"])
def test_data_parallel_snippets_train_on_four_host_devices(snippet):
    environment = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    code = (
        "import jax, runpy; assert jax.device_count() == 4; "
        f"losses = runpy.run_path({str(DOCS / (snippet + '.py'))!r})['losses']; "
        "assert losses[-1] < 0.5 * losses[0], losses"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("loss") == 5


# --- the optax transform: interplay and misuse ------------------------------------------------


def _linear_problem():
    """A smooth loss on two batches, float32, for the transform's interplay tests."""
    rng = np.random.default_rng(5)
    params = {"w": rng.standard_normal((3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
    batches = [
        (
            rng.standard_normal((8, 3)).astype(np.float32),
            rng.standard_normal((8, 2)).astype(np.float32),
        )
        for _ in range(2)
    ]

    def loss_fn(p, xb, yb):
        return jnp.mean(jnp.tanh(xb @ p["w"] + p["b"] - yb) ** 2)

    return loss_fn, params, batches


def test_inject_hyperparams_follows_a_changed_learning_rate():
    loss_fn, params, [(x, y), _] = _linear_problem()
    grad_fn = jax.grad(lambda p: loss_fn(p, x, y))
    injected = optax.inject_hyperparams(gdreg.gradient_norm_penalty)(
        learning_rate=LR, strength=STRENGTH, method="jvp"
    )
    update = jax.jit(lambda s: injected.update(grad_fn(params), s, params, penalty_grad_fn=grad_fn))
    state = injected.init(params)
    out, _ = update(state)
    plain = gdreg.gradient_norm_penalty(learning_rate=LR, strength=STRENGTH, method="jvp")
    expected, _ = plain.update(grad_fn(params), plain.init(params), params, penalty_grad_fn=grad_fn)
    assert_tree_close(out, expected, rtol=1e-5)  # float32, jitted against eager
    state.hyperparams["learning_rate"] = jnp.asarray(2 * LR)  # as reduce-on-plateau would
    out, _ = update(state)
    doubled = jax.tree.map(lambda e, g: g + 2 * (e - g), expected, grad_fn(params))
    assert_tree_close(out, doubled, rtol=1e-5)  # float32, jitted against eager


def test_strength_schedule_and_sam_in_one_chain():
    loss_fn, params, [(x, y), _] = _linear_problem()
    grad_fn = jax.grad(lambda p: loss_fn(p, x, y))
    strengths = optax.piecewise_constant_schedule(1.0, {1: 0.25})
    scheduled = gdreg.gradient_norm_penalty(learning_rate=LR, strength=strengths, method="jvp")
    state = scheduled.init(params)
    for step in range(2):
        out, state = scheduled.update(grad_fn(params), state, params, penalty_grad_fn=grad_fn)
        fixed = gdreg.gradient_norm_penalty(
            learning_rate=LR, strength=strengths(step), method="jvp"
        )
        expected, _ = fixed.update(
            grad_fn(params), fixed.init(params), params, penalty_grad_fn=grad_fn
        )
        assert_tree_close(out, expected, rtol=1e-6)

    # optax.contrib.sam accepts no keyword but its grad_fn(params, i): the penalty reads it too.
    sam = optax.contrib.sam(
        optax.sgd(LR), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), opaque_mode=True
    )
    penalty = gdreg.gradient_norm_penalty(
        learning_rate=LR, method="jvp", check=True, read_sam_grad_fn=True
    )
    chain = optax.chain(penalty, sam)

    def sam_grad_fn(p, _):
        return grad_fn(p)

    out, _ = chain.update(grad_fn(params), chain.init(params), params, grad_fn=sam_grad_fn)
    penalized, _ = penalty.update(
        grad_fn(params), penalty.init(params), params, penalty_grad_fn=grad_fn
    )
    expected, _ = sam.update(penalized, sam.init(params), params, grad_fn=sam_grad_fn)
    assert_tree_close(out, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="penalty_grad_fn=<params -> gradient>"):
        penalty.update(grad_fn(params), penalty.init(params), params, grad_fn=grad_fn)
    # Without the opt-in a grad_fn is refused: the old one-argument convention, or a
    # grad_fn(params, x=batch) that would silently get x=0, never reach the penalty.
    plain = gdreg.gradient_norm_penalty(learning_rate=LR)
    with pytest.raises(ValueError, match="read_sam_grad_fn"):
        plain.update(grad_fn(params), plain.init(params), params, grad_fn=sam_grad_fn)


def test_masked_raises_a_clear_error_and_the_drop_in_masks_what_follows():
    loss_fn, params, [(x, y), _] = _linear_problem()
    grad_fn = jax.grad(lambda p: loss_fn(p, x, y))
    mask = {"w": True, "b": False}
    masked = optax.masked(gdreg.gradient_norm_penalty(learning_rate=LR), mask)
    with pytest.raises(ValueError, match=r"optax\.masked"):
        masked.update(grad_fn(params), masked.init(params), params, penalty_grad_fn=grad_fn)
    # The recommended path: the gradient arrives penalized, the mask applies to what follows.
    f = gdreg.value_and_penalized_grad(loss_fn, learning_rate=LR, method="jvp")
    _, grads = f(params, x, y)
    frozen_bias = optax.masked(optax.sgd(LR), mask)
    updates, _ = frozen_bias.update(grads, frozen_bias.init(params), params)
    np.testing.assert_allclose(updates["w"], -LR * grads["w"], rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], grads["b"])  # masked out: passed through


def test_multisteps_accumulates_penalized_gradients():
    loss_fn, params, batches = _linear_problem()
    f = gdreg.value_and_penalized_grad(loss_fn, learning_rate=LR, method="jvp")
    accumulate = optax.MultiSteps(optax.sgd(LR), every_k_schedule=2)
    state = accumulate.init(params)
    new_params = params
    penalized = []
    for x, y in batches:
        _, grads = f(params, x, y)
        penalized.append(grads)
        updates, state = accumulate.update(grads, state, new_params)
        new_params = optax.apply_updates(new_params, updates)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *penalized)
    assert_tree_close(new_params, jax.tree.map(lambda p, g: p - LR * g, params, mean), rtol=1e-6)


def _misuse_cases():
    loss_fn, params, [(x, y), (x2, y2)] = _linear_problem()
    grad_fn = jax.grad(lambda p: loss_fn(p, x, y))
    other_batch = jax.grad(lambda p: loss_fn(p, x2, y2))
    checked = gdreg.gradient_norm_penalty(learning_rate=LR, check=True)
    cases = {
        "clipping before": (optax.chain(optax.clip_by_global_norm(1e-3), checked), grad_fn),
        "weight decay before": (optax.chain(optax.add_decayed_weights(0.5), checked), grad_fn),
        "after the optimizer": (optax.chain(optax.sgd(LR, momentum=0.9), checked), grad_fn),
        "another batch": (checked, other_batch),
    }
    return params, grad_fn(params), cases


@pytest.mark.parametrize(
    "case", ["clipping before", "weight decay before", "after the optimizer", "another batch"]
)
def test_check_catches_misuse_eagerly_and_under_jit(case):
    params, grads, cases = _misuse_cases()
    tx, penalty_grad_fn = cases[case]
    with pytest.raises(ValueError, match="differs from the incoming gradient"):
        tx.update(grads, tx.init(params), params, penalty_grad_fn=penalty_grad_fn)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, penalty_grad_fn=penalty_grad_fn))
    with pytest.raises(Exception, match="differs from the incoming gradient"):
        jax.block_until_ready(update(grads, tx.init(params), params))


def test_check_passes_correct_use_and_catches_multisteps():
    loss_fn, params, batches = _linear_problem()
    checked = gdreg.gradient_norm_penalty(learning_rate=LR, check=True)
    x, y = batches[0]
    grad_fn = jax.grad(lambda p: loss_fn(p, x, y))
    jax.jit(lambda s: checked.update(grad_fn(params), s, params, penalty_grad_fn=grad_fn))(
        checked.init(params)
    )
    accumulate = optax.MultiSteps(checked, every_k_schedule=2)
    state = accumulate.init(params)
    # MultiSteps calls the inner update under lax.cond: the check reports through a callback.
    with pytest.raises(Exception, match="differs from the incoming gradient"):
        for x, y in batches:  # the inner update sees the mean of both batches' gradients
            grad_fn = jax.grad(lambda p, x=x, y=y: loss_fn(p, x, y))
            _, state = accumulate.update(grad_fn(params), state, params, penalty_grad_fn=grad_fn)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"learning_rate": -0.1}, ValueError),
        ({"learning_rate": float("nan")}, ValueError),
        ({"learning_rate": True}, TypeError),
        ({"learning_rate": 0.1, "eps": 0.0}, ValueError),
        ({"learning_rate": 0.1, "eps": float("inf")}, ValueError),
        ({"learning_rate": 0.1, "strength": "0.5"}, TypeError),
        ({"learning_rate": 0.1, "method": "Forward"}, ValueError),
    ],
)
def test_bad_arguments_name_themselves(bad, error):
    name = next(reversed(bad))
    for build in (gdreg.gradient_norm_penalty, gdreg.value_and_penalized_grad):
        with pytest.raises(error, match=name):
            build(**bad) if build is gdreg.gradient_norm_penalty else build(jnp.sum, **bad)


def test_transform_construction_errors():
    with pytest.raises(TypeError, match="learning_rate"):
        gdreg.gradient_norm_penalty()  # no silent default of 1.0
    with pytest.raises(TypeError):
        gdreg.gradient_norm_penalty(0.5, 0.1)  # keywords only: no swapped positions


# --- Flax helpers -----------------------------------------------------------------------------


def test_penalty_train_state_forwards_update_arguments():
    from flax.training import train_state

    loss_fn, params, [(x, y), _] = _linear_problem()
    grad_fn = jax.grad(lambda p: loss_fn(p, x, y))
    tx = optax.chain(
        gdreg.gradient_norm_penalty(learning_rate=LR, method="jvp", check=True), optax.sgd(LR)
    )
    state = gdreg.PenaltyTrainState.create(apply_fn=None, params=params, tx=tx)
    with pytest.raises(ValueError, match="penalty_grad_fn"):
        train_state.TrainState.create(apply_fn=None, params=params, tx=tx).apply_gradients(
            grads=grad_fn(params), penalty_grad_fn=grad_fn
        )
    stepped = jax.jit(
        lambda s: s.apply_gradients(grads=grad_fn(s.params), penalty_grad_fn=grad_fn)
    )(state)
    updates, _ = tx.update(grad_fn(params), tx.init(params), params, penalty_grad_fn=grad_fn)
    assert_tree_close(stepped.params, optax.apply_updates(params, updates), rtol=1e-6)
    assert int(stepped.step) == 1 and stepped.tx is tx

    class WithStatistics(gdreg.PenaltyTrainState):
        statistics: dict

    state = WithStatistics.create(apply_fn=None, params=params, tx=tx, statistics={"n": 0})
    stepped = state.apply_gradients(
        grads=grad_fn(params), penalty_grad_fn=grad_fn, statistics={"n": 1}
    )
    assert stepped.statistics == {"n": 1}  # a field: replaced, as in Flax
    assert_tree_close(stepped.params, optax.apply_updates(params, updates), rtol=1e-6)


# flax's Dropout scatters a float32 constant into float64 activations under x64: its warning.
FLAX_DROPOUT_X64 = pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")


class _NnxNet(nnx.Module):
    """Linear -> BatchNorm -> tanh -> Dropout -> Linear, float64."""

    def __init__(self, rngs):
        kwargs = {"dtype": jnp.float64, "param_dtype": jnp.float64, "rngs": rngs}
        self.hidden = nnx.Linear(3, 6, **kwargs)
        self.norm = nnx.BatchNorm(6, momentum=0.8, **kwargs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(6, 2, **kwargs)

    def __call__(self, x):
        return self.out(self.dropout(jnp.tanh(self.norm(self.hidden(x)))))


def _nnx_loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@FLAX_DROPOUT_X64
@pytest.mark.parametrize(
    ("method", "eps", "rtol", "atol"),
    # jvp: one pass, exact. forward: a second pass at perturbed weights, which must see the
    # same dropout masks and batch statistics (else the error is of order 1); O(eps) error.
    # atol: the zero gradient of the bias before BatchNorm, divided by eps_n in forward mode.
    [("jvp", 1e-2, 1e-10, 1e-14), ("forward", 1e-7, 1e-5, 1e-9)],
)
def test_nnx_helper_same_masks_one_state_update_and_exact_penalty(x64, method, eps, rtol, atol):
    x, y = regression()
    model = _NnxNet(nnx.Rngs(0, dropout=1))
    before = nnx.clone(model)
    f = gdreg.nnx_value_and_penalized_grad(_nnx_loss, learning_rate=LR, method=method, eps=eps)
    value, grads = nnx.jit(f)(model, x, y)

    # Reference: the loss at fixed dropout masks and batch statistics (a pure function of the
    # parameters started from the same snapshot every time), with jax.hessian.
    graphdef, params, rest = nnx.split(before, nnx.Param, ...)

    def loss_of_params(p):
        return _nnx_loss(nnx.merge(graphdef, p, rest, copy=True), x, y)

    assert_tree_close(
        grads, _closed_form(loss_of_params, nnx.to_pure_dict(params)), rtol=rtol, atol=atol
    )

    # The model's state moved as after one plain call: same running statistics, same RNG count.
    plain = nnx.clone(before)
    np.testing.assert_allclose(value, _nnx_loss(plain, x, y), rtol=1e-14)

    def other_state(m):
        def comparable(leaf):
            is_key = jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
            return jax.random.key_data(leaf) if is_key else leaf

        return jax.tree.map(comparable, nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param))))

    assert_tree_close(other_state(model), other_state(plain), rtol=0)
    assert not np.allclose(  # the check can fail: the statistics did move
        ravel_pytree(other_state(model))[0], ravel_pytree(other_state(before))[0]
    )
    assert jax.tree.structure(grads) == jax.tree.structure(nnx.state(model, nnx.Param))


@FLAX_DROPOUT_X64
def test_nnx_grad_fn_with_fresh_dropout_masks_is_caught_by_check(x64):
    x, y = regression()
    model = _NnxNet(nnx.Rngs(0, dropout=1))
    tx = gdreg.gradient_norm_penalty(learning_rate=LR, check=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def careless_grad_fn(p):  # the live model: every call draws new dropout masks
        nnx.update(model, p)
        return nnx.to_pure_dict(nnx.grad(_nnx_loss)(model, x, y))

    grads = careless_grad_fn(params)
    with pytest.raises(ValueError, match="dropout masks"):
        tx.update(grads, tx.init(params), params, penalty_grad_fn=careless_grad_fn)


@functools.cache
def _snippet(name):
    """The docs/penalty.md snippet's module namespace after it ran (trained, float32)."""
    return runpy.run_path(str(DOCS / f"{name}.py"), run_name="__main__")


@pytest.mark.parametrize("name", ["penalty_jax", "penalty_linen", "penalty_nnx"])
def test_readme_snippets_train(name, capsys):
    namespace = _snippet(name)
    losses = namespace["losses"]
    assert losses[-1] < 0.5 * losses[0]
    if "final_accuracy" in namespace:
        assert namespace["final_accuracy"] > 0.9
    assert capsys.readouterr().out.count("loss") >= len(losses) - 1


@pytest.mark.parametrize("mistake", ["incoming gradient not averaged", "no axis_name"])
def test_check_catches_a_missing_cross_device_mean(mistake):
    loss_fn, params, x, y = tanh_mlp_problem(np.float32)
    mesh = jax.make_mesh((4,), ("batch",), devices=jax.devices()[:4])
    x_sharded, y_sharded = jax.device_put((x, y), NamedSharding(mesh, P("batch")))
    axis_name = "batch" if mistake == "incoming gradient not averaged" else None
    tx = gdreg.gradient_norm_penalty(learning_rate=LR, axis_name=axis_name)  # default check

    def body(p, xb, yb):
        local = jax.grad(loss_fn)(p, xb, yb)
        incoming = local if axis_name else jax.lax.pmean(local, "batch")
        return tx.update(
            incoming, tx.init(p), p, penalty_grad_fn=lambda q: jax.grad(loss_fn)(q, xb, yb)
        )[0]

    sharded = jax.shard_map(
        body, mesh=mesh, in_specs=(P(), P("batch"), P("batch")), out_specs=P(), check_vma=False
    )
    with pytest.raises(Exception, match="differs from the incoming gradient"):
        jax.block_until_ready(jax.jit(sharded)(params, x_sharded, y_sharded))


@pytest.mark.parametrize("method", ["forward", "central"])
def test_bfloat16_parameters_give_the_float32_penalty(method):
    loss_fn, params, x, y = tanh_mlp_problem(np.float32)

    def bf16_loss(p, xb, yb):  # the parameters are bfloat16, the loss is computed in float32
        return loss_fn(jax.tree.map(lambda leaf: leaf.astype(jnp.float32), p), xb, yb)

    bf16_params = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.bfloat16), params)
    f = gdreg.value_and_penalized_grad(bf16_loss, learning_rate=LR, method=method)
    _, grads = jax.jit(f)(bf16_params, x, y)
    exact = gdreg.value_and_penalized_grad(loss_fn, learning_rate=LR, method="jvp")
    f32_params = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), bf16_params)
    _, expected = jax.jit(exact)(f32_params, x, y)
    g = jax.grad(loss_fn)(f32_params, x, y)
    added = ravel_pytree(jax.tree.map(lambda a, b: a.astype(jnp.float32) - b, grads, g))[0]
    wanted = ravel_pytree(jax.tree.map(jnp.subtract, expected, g))[0]
    # Up to the bfloat16 rounding of the returned gradient itself (2^-8 of each entry of g').
    assert float(jnp.linalg.norm(added - wanted) / jnp.linalg.norm(wanted)) < 0.05


def test_check_uses_the_recomputed_gradient_as_the_forward_base():
    loss_fn, params, [(x, y), _] = _linear_problem()
    grad_fn = jax.grad(lambda p: loss_fn(p, x, y))
    # A weight decay small enough to pass the check: the penalty must stay right anyway.
    chain = optax.chain(
        optax.add_decayed_weights(3e-6),
        gdreg.gradient_norm_penalty(learning_rate=LR, eps=1e-3, check=True),
    )
    out, _ = chain.update(grad_fn(params), chain.init(params), params, penalty_grad_fn=grad_fn)
    decayed = jax.tree.map(lambda g, p: g + 3e-6 * p, grad_fn(params), params)
    exact = gdreg.gradient_norm_penalty(learning_rate=LR, method="jvp")
    expected, _ = exact.update(decayed, exact.init(params), params, penalty_grad_fn=grad_fn)
    added = ravel_pytree(jax.tree.map(jnp.subtract, out, decayed))[0]
    wanted = ravel_pytree(jax.tree.map(jnp.subtract, expected, decayed))[0]
    assert float(jnp.linalg.norm(added - wanted) / jnp.linalg.norm(wanted)) < 0.02


def _float64(tree):
    return jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), tree)


@FLAX_DROPOUT_X64
def test_readme_snippet_losses_with_the_penalty_equal_the_explicit_hessian(x64):
    """Each snippet's own loss_fn and trained model, in float64, method "jvp" (exact, so that
    the ReLU snippets compare too: jax.hessian uses the same derivative rules on ReLU pieces)."""
    batch = slice(0, 64)
    plain = _snippet("penalty_jax")
    params = _float64(plain["params"])
    x, y = _float64((plain["x_train"][batch], plain["y_train"][batch]))
    f = gdreg.value_and_penalized_grad(plain["loss_fn"], learning_rate=LR, method="jvp")
    expected = _closed_form(lambda p: plain["loss_fn"](p, x, y), params)
    assert_tree_close(f(params, x, y)[1], expected, rtol=1e-10, atol=1e-14)

    linen = _snippet("penalty_linen")
    state = linen["state"]
    params, stats = _float64(state.params), _float64(state.batch_stats)
    x, y = _float64(linen["images"][batch]), np.asarray(linen["labels"][batch])
    loss_fn = linen["loss_fn"]
    f = gdreg.value_and_penalized_grad(loss_fn, learning_rate=LR, method="jvp", has_aux=True)
    (_, new_stats), grads = f(params, stats, x, y)
    expected = _closed_form(lambda p: loss_fn(p, stats, x, y)[0], params)
    assert_tree_close(grads, expected, rtol=1e-10, atol=1e-14)
    assert_tree_close(new_stats, loss_fn(params, stats, x, y)[1], rtol=1e-14)

    nnx_snippet = _snippet("penalty_nnx")
    graphdef, params, rest = nnx.split(nnx_snippet["model"], nnx.Param, ...)
    params = _float64(nnx.to_pure_dict(params))
    x, y = _float64(nnx_snippet["images"][batch]), np.asarray(nnx_snippet["labels"][batch])
    loss_fn = nnx_snippet["loss_fn"]
    model = nnx.merge(graphdef, params, rest, copy=True)
    model.train()
    train_graphdef, _, train_rest = nnx.split(model, nnx.Param, ...)

    def loss_of_params(p):
        return loss_fn(nnx.merge(train_graphdef, p, train_rest, copy=True), x, y)

    # The reference first: the step below moves the model's state, which train_rest shares.
    expected = _closed_form(loss_of_params, params)
    _, grads = gdreg.nnx_value_and_penalized_grad(loss_fn, learning_rate=LR, method="jvp")(
        model, x, y
    )
    assert_tree_close(nnx.to_pure_dict(grads), expected, rtol=1e-10, atol=1e-14)
