"""Tests for gdreg.penalty: the Hessian-vector product and the gradient-norm penalty transform."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import gdreg
from gdreg.penalty import GradientNormPenaltyState, gradient_norm_penalty, hessian_vector_product


def _tree_allclose(actual, expected, rtol, atol=0.0):
    jax.tree.map(
        lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol),
        actual,
        expected,
    )


def _add_scaled(tree, scale, other):
    """tree + scale * other, leaf by leaf."""
    return jax.tree.map(lambda t, o: t + scale * o, tree, other)


def _rel_err(a, b):
    # In numpy: float64 arrays must not meet JAX while x64 is off (they would become float32).
    fa = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
    fb = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(fa - fb) / np.linalg.norm(fb))


# --- small float64 networks with an explicit Hessian ---------------------------------------------


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Conv(4, (3, 3))(x))
        return nn.Dense(3)(jnp.mean(h, axis=(1, 2)))


@functools.cache
def _network_results(kind):
    """Hessian-vector products of a tiny smooth float64 classifier, in one compiled computation.

    Returns the number of parameters and a dict: "exact" (explicit Hessian, from jax.hessian on
    the flattened parameters, times v), "jvp", "forward@eps", "central@eps" and
    "forward_no_grads@1e-3" (forward differences that evaluate the base gradient themselves),
    all for v = 0.5 * gradient.
    """
    # numpy data and parameters: eager JAX ops would each compile once, slow on 2 cores.
    rng = np.random.default_rng(1)
    if kind == "mlp":
        model, x = _MLP(), rng.standard_normal((16, 4))
    else:
        model, x = _CNN(), rng.standard_normal((8, 6, 6, 2))
    labels = rng.integers(0, 3, x.shape[0])
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    params = jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape), shapes)
    with jax.enable_x64(True):

        def loss(p):
            logits = model.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        @jax.jit
        def compute(params):
            grad_fn = jax.grad(loss)
            grads = grad_fn(params)
            vector = jax.tree.map(lambda g: 0.5 * g, grads)
            flat, unravel = ravel_pytree(params)
            hessian = jax.hessian(lambda f: loss(unravel(f)))(flat)
            out = {
                "exact": unravel(hessian @ ravel_pytree(vector)[0]),
                "jvp": hessian_vector_product(grad_fn, params, vector, method="jvp"),
                "forward_no_grads@0.001": hessian_vector_product(
                    grad_fn, params, vector, method="forward", eps=1e-3
                ),
            }
            for method in ("forward", "central"):
                for eps in EPS_PAIR:
                    out[f"{method}@{eps}"] = hessian_vector_product(
                        grad_fn, params, vector, method=method, eps=eps, grads=grads
                    )
            return out

        n_params = sum(leaf.size for leaf in jax.tree.leaves(params))
        return n_params, jax.tree.structure(params), compute(params)


EPS_PAIR = (1e-2, 1e-3)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_jvp_matches_explicit_hessian(kind):
    n_params, structure, out = _network_results(kind)
    assert 50 <= n_params <= 500
    assert jax.tree.structure(out["jvp"]) == structure
    assert all(leaf.dtype == np.float64 for leaf in jax.tree.leaves(out["jvp"]))
    assert _rel_err(out["jvp"], out["exact"]) < 1e-10


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize(("method", "order"), [("forward", 1.0), ("central", 2.0)])
def test_finite_difference_convergence_order(kind, method, order):
    _, _, out = _network_results(kind)
    errors = [_rel_err(out[f"{method}@{eps}"], out["exact"]) for eps in EPS_PAIR]
    observed = math.log(errors[0] / errors[1]) / math.log(EPS_PAIR[0] / EPS_PAIR[1])
    assert abs(observed - order) < 0.2, (errors, observed)
    if method == "forward":  # evaluating the base gradient itself gives the same result
        assert _rel_err(out["forward_no_grads@0.001"], out["exact"]) == pytest.approx(
            errors[1], rel=1e-6
        )


# --- quadratic loss with a known, constant Hessian ------------------------------------------------


def _quadratic(dtype=np.float64, seed=0):
    """0.5 z^T A z - b^T z with z = concat(params["u"], params["w"]); Hessian A.

    Returns (loss, params, grads, hessian_times, split); the data are numpy arrays so that
    nothing runs eagerly in JAX (every eager op compiles once, which is slow on 2 cores).
    """
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((5, 5))
    a = (m @ m.T / 5 + np.eye(5)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    z0 = rng.standard_normal(5).astype(dtype)

    def split(z):
        return {"u": z[:2], "w": z[2:]}

    def loss(p):
        z = jnp.concatenate([p["u"], p["w"]]).astype(a.dtype)
        return 0.5 * z @ a @ z - b @ z

    def hessian_times(tree):
        return split(a @ np.concatenate([np.asarray(tree["u"]), np.asarray(tree["w"])]))

    return loss, split(z0), split(a @ z0 - b), hessian_times, split


@pytest.mark.parametrize("method", ["forward", "central", "jvp"])
def test_quadratic_added_term_with_schedule(x64, method):
    loss, params, grads, hessian_times, _ = _quadratic()
    strength = 0.5
    schedule = optax.linear_schedule(1.0, 0.2, transition_steps=10)
    tx = gradient_norm_penalty(strength=strength, learning_rate=schedule, method=method)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, penalty_grad_fn=jax.grad(loss)))
    state = tx.init(params)
    assert isinstance(state, GradientNormPenaltyState)
    assert state.count.dtype == jnp.int32 and state.count.shape == ()
    rtol = 1e-12 if method == "jvp" else 1e-9

    ag = hessian_times(grads)
    for step in range(4):
        out, new_state = update(grads, state, params)
        assert int(new_state.count) == step + 1
        if step in (0, 3):
            # Evaluated at the int32 count, as optax.sgd does (so float32 even under x64).
            lr_t = float(schedule(state.count))
            assert lr_t == pytest.approx(1.0 - 0.08 * step)
            added = jax.tree.map(lambda o, g: np.asarray(o) - g, out, grads)
            expected = jax.tree.map(lambda h, c=strength * lr_t / 4: c * h, ag)
            _tree_allclose(added, expected, rtol=rtol, atol=1e-14)
        state = new_state


@pytest.mark.parametrize("method", ["forward", "central", "jvp"])
def test_full_strength_adds_full_gradient_to_vector(x64, method):
    loss, params, grads, hessian_times, split = _quadratic()
    full_grads = split(np.random.default_rng(7).standard_normal(5))
    lr = 0.8
    for strength, full_strength in [(0.5, 0.3), (0.0, 0.3)]:
        tx = gradient_norm_penalty(
            strength=strength, learning_rate=lr, method=method, full_strength=full_strength
        )
        out, _ = jax.jit(
            lambda g, s, p, f, tx=tx: tx.update(
                g, s, p, penalty_grad_fn=jax.grad(loss), full_grads=f
            )
        )(grads, tx.init(params), params, full_grads)
        v = _add_scaled(jax.tree.map(lambda g, s=strength: s * g, grads), full_strength, full_grads)
        _tree_allclose(out, _add_scaled(grads, lr / 4, hessian_times(v)), rtol=1e-9)


@pytest.mark.parametrize("method", ["forward", "central", "jvp"])
def test_zero_gradient_gives_zero_correction(method):
    a = np.array([[2.0, 0.5], [0.5, 1.0]], np.float32)

    def loss(p):
        return 0.5 * p["z"] @ a @ p["z"]

    grad_fn = jax.grad(loss)
    tx = gradient_norm_penalty(strength=0.5, learning_rate=1.0, method=method)

    @jax.jit
    def run(params, zeros):
        grads = grad_fn(params)
        out, _ = tx.update(grads, tx.init(params), params, penalty_grad_fn=grad_fn)
        # A zero vector where the gradient is not zero: the masked difference is zero too.
        shifted = jax.tree.map(lambda z: z + 1.0, params)
        hvp = hessian_vector_product(grad_fn, shifted, zeros, method=method, grads=grad_fn(shifted))
        return grads, out, hvp

    zeros = {"z": np.zeros(2, np.float32)}
    grads, out, hvp = run(zeros, zeros)  # at the minimum the gradient is exactly zero
    assert not np.any(np.asarray(grads["z"]))
    np.testing.assert_array_equal(out["z"], np.zeros(2))
    np.testing.assert_array_equal(hvp["z"], np.zeros(2))


@pytest.mark.parametrize("method", ["forward", "central"])
def test_huge_vector_does_not_overflow_the_step(method):
    # ||v||^2 overflows float32 here; the step eps / ||v|| must still be finite and non-zero.
    a = np.array([[2.0, 0.5], [0.5, 1.0]], np.float32)
    grad_fn = jax.grad(lambda p: 0.5 * p["z"] @ a @ p["z"])
    params = {"z": np.array([1.0, -2.0], np.float32)}
    vector = {"z": np.array([3e25, -1e25], np.float32)}
    hvp = jax.jit(
        lambda p, v: hessian_vector_product(grad_fn, p, v, method=method, grads=grad_fn(p))
    )(params, vector)
    np.testing.assert_allclose(hvp["z"], a.astype(np.float64) @ vector["z"], rtol=1e-3)


def test_strength_zero_is_identity_and_never_calls_grad_fn():
    def forbidden(params):
        raise AssertionError("grad_fn must not be called")

    tx = gradient_norm_penalty(strength=0.0, learning_rate=0.1, full_strength=0.0)
    params = {"w": np.ones(3, np.float32)}
    grads = {"w": np.array([1.0, -2.0, 3.0], np.float32)}
    state = tx.init(params)
    out, state = tx.update(grads, state, params, penalty_grad_fn=forbidden)
    assert out is grads
    out, state = tx.update(grads, state, params)  # no grad_fn needed either
    assert out is grads
    assert int(state.count) == 2


@pytest.mark.parametrize("method", ["forward", "central", "jvp"])
def test_bfloat16_uses_float32_path(method):
    loss, params32, grads32, hessian_times, _ = _quadratic(np.float32, seed=3)
    params, grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), (params32, grads32))
    seen_dtypes = []

    def grad_fn(p):
        seen_dtypes.extend(leaf.dtype for leaf in jax.tree.leaves(p))  # recorded while tracing
        return jax.grad(loss)(p)

    tx = gradient_norm_penalty(strength=2.0, learning_rate=0.5, method=method)
    update = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, penalty_grad_fn=grad_fn)[0])
    out = update(grads, params)
    assert seen_dtypes and all(d == jnp.float32 for d in seen_dtypes)
    for leaf in jax.tree.leaves(out):
        assert leaf.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))

    if method != "forward":
        # Bit-identical to the same update on the float32 upcasts, rounded to bfloat16 at the
        # end. (Forward differences differ: for upcast parameters they recompute their base
        # gradient at the float32 copies instead of taking the bfloat16 incoming one.)
        up = jax.tree.map(lambda x: x.astype(jnp.float32), (grads, params))
        # The rounded gradient is not the float32 gradient of the float32 parameters: no check.
        unchecked = gradient_norm_penalty(
            strength=2.0, learning_rate=0.5, method=method, check=False
        )
        ref = jax.jit(
            lambda g, p: unchecked.update(g, unchecked.init(p), p, penalty_grad_fn=grad_fn)[0]
        )(*up)
        jax.tree.map(
            lambda a, r: np.testing.assert_array_equal(
                np.asarray(a, np.float32), np.asarray(r.astype(jnp.bfloat16), np.float32)
            ),
            out,
            ref,
        )

    g32 = jax.tree.map(lambda g: np.asarray(g, np.float32), grads)
    exact = _add_scaled(g32, 2.0 * 0.5 / 4, hessian_times(g32))
    _tree_allclose(jax.tree.map(lambda x: np.asarray(x, np.float32), out), exact, rtol=2e-2)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"method": "backward"}, "method"),
        ({"strength": -1.0}, "strength"),
        ({"full_strength": -0.5}, "full_strength"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-3}, "eps"),
    ],
)
def test_bad_construction_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        gradient_norm_penalty(**{"learning_rate": 0.1, **kwargs})


def test_bad_update_arguments():
    params = {"w": np.ones(2, np.float32)}
    grads = {"w": np.ones(2, np.float32)}
    grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 3))
    tx = gradient_norm_penalty(learning_rate=1.0)
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(grads, tx.init(params), params)
    tx = gradient_norm_penalty(learning_rate=1.0, full_strength=0.5)
    with pytest.raises(ValueError, match="full_grads"):
        tx.update(grads, tx.init(params), params, penalty_grad_fn=grad_fn)
    with pytest.raises(ValueError, match="method"):
        hessian_vector_product(grad_fn, params, grads, method="exact")
    with pytest.raises(ValueError, match="eps"):
        hessian_vector_product(grad_fn, params, grads, eps=0.0)
    with pytest.raises(ValueError, match="grad_fn"):  # output not shaped like the parameters
        hessian_vector_product(lambda p: {"w": np.ones(3, np.float32)}, params, grads)
    # Unknown extra arguments (meant for other transformations of a chain) are ignored. (The
    # ones are not the gradient 3 w^2 of this loss: the check is off.)
    tx = gradient_norm_penalty(learning_rate=1.0, method="jvp", check=False)
    out, _ = jax.jit(
        lambda g, s, p: tx.update(g, s, p, penalty_grad_fn=grad_fn, value=1.0, unrelated="x")
    )(grads, tx.init(params), params)
    # lr 1: g + 1/4 * H (0.5 g) with H = diag(6 w) = 6 I and g = 1.
    np.testing.assert_allclose(out["w"], 1.0 + 1.0 / 4 * 6.0 * 0.5)


# --- composition with optax.chain and Flax training loops ----------------------------------------

LR, STRENGTH, STEPS = 0.08, 16.0, 30  # exaggerated strength so the effect is clear in 30 steps


def _regression_data(shape=(64, 4), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    return x, np.sin(x @ rng.standard_normal(shape[-1]).astype(np.float32))[..., None]


class _Regressor(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))


def _train_linen(tx):
    x, y = _regression_data()
    model = _Regressor()

    def loss_fn(p):
        return jnp.mean((model.apply(p, x) - y) ** 2)

    def step(carry, _):
        p, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = tx.update(grads, opt_state, p, penalty_grad_fn=jax.grad(loss_fn))
        return (optax.apply_updates(p, updates), opt_state), loss

    @jax.jit
    def train(key):
        p = model.init(key, x)
        (p, _), losses = jax.lax.scan(step, (p, tx.init(p)), None, length=STEPS)
        return losses, loss_fn(p), optax.tree.norm(jax.grad(loss_fn)(p))

    return train(jax.random.key(2))


def test_chain_trains_linen_model():
    penalized = optax.chain(
        gdreg.gradient_norm_penalty(strength=STRENGTH, learning_rate=LR), optax.sgd(LR)
    )
    losses, final_loss, grad_norm = _train_linen(penalized)
    _, _, plain_grad_norm = _train_linen(optax.sgd(LR))
    assert final_loss < 0.5 * losses[0]
    assert np.all(np.diff(np.asarray(losses)) < 0)
    assert grad_norm < plain_grad_norm


class _NnxRegressor(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 16, rngs=rngs)
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def _train_nnx(tx):
    x, y = _regression_data()
    model = _NnxRegressor(nnx.Rngs(2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_of(graphdef, rest):
        # A function of the parameter state alone, as grad_fn must be.
        return lambda p: jnp.mean((nnx.merge(graphdef, p, rest)(x) - y) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss_fn = loss_of(graphdef, rest)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        optimizer.update(model, grads, penalty_grad_fn=jax.grad(loss_fn))
        return loss, optax.tree.norm(grads)

    # Loss and gradient norm of each call are those before its update, so the extra last call
    # measures the model after STEPS updates.
    history = [train_step(model, optimizer) for _ in range(STEPS + 1)]
    losses = [float(loss) for loss, _ in history]
    return losses[:-1], losses[-1], float(history[-1][1])


def test_chain_trains_nnx_model():
    penalized = optax.chain(
        gdreg.gradient_norm_penalty(strength=STRENGTH, learning_rate=LR), optax.sgd(LR)
    )
    losses, final_loss, grad_norm = _train_nnx(penalized)
    _, _, plain_grad_norm = _train_nnx(optax.sgd(LR))
    assert final_loss < 0.5 * losses[0]
    assert np.all(np.diff(losses) < 0)
    assert grad_norm < plain_grad_norm


def test_nnx_grad_output_is_matched_to_pure_parameters():
    # nnx.grad returns Param variables, the nnx.Optimizer passes plain arrays: matched leafwise.
    x, y = _regression_data()
    model = _NnxRegressor(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.as_pure(params)

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    def wrapped_grad_fn(p):
        return nnx.grad(loss)(nnx.merge(graphdef, p, rest))

    def pure_grad_fn(p):
        return jax.grad(lambda q: loss(nnx.merge(graphdef, q, rest)))(p)

    @jax.jit
    def both(p):
        v = pure_grad_fn(p)
        return [
            hessian_vector_product(f, p, v, method="forward", grads=v)
            for f in (wrapped_grad_fn, pure_grad_fn)
        ]

    wrapped, pure = both(params)
    assert jax.tree.structure(wrapped) == jax.tree.structure(params)
    _tree_allclose(wrapped, pure, rtol=1e-6)


def test_vmap_over_blocks_equals_loop():
    xs, ys = _regression_data((4, 16, 4), seed=5)  # 4 blocks of 16 examples
    model = _Regressor()
    params = jax.jit(model.init)(jax.random.key(5), xs[0])
    methods = ("forward", "jvp")
    txs = {
        m: gradient_norm_penalty(strength=0.5, learning_rate=optax.constant_schedule(0.8), method=m)
        for m in methods
    }
    states = {m: tx.init(params) for m, tx in txs.items()}

    def block_update(p, s, xb, yb):
        grad_fn = jax.grad(lambda q: jnp.mean((model.apply(q, xb) - yb) ** 2))
        g = grad_fn(p)
        return {m: tx.update(g, s[m], p, penalty_grad_fn=grad_fn) for m, tx in txs.items()}

    batched = jax.jit(jax.vmap(block_update, in_axes=(None, None, 0, 0)))(params, states, xs, ys)
    single = jax.jit(block_update)
    for i in range(4):
        looped = single(params, states, xs[i], ys[i])
        for m in methods:
            updates, state = batched[m]
            np.testing.assert_array_equal(state.count, np.ones(4))
            _tree_allclose(
                jax.tree.map(lambda b, i=i: b[i], updates), looped[m][0], rtol=1e-5, atol=1e-6
            )
    for m in methods:
        assert all(np.abs(np.asarray(b)).mean() > 0 for b in jax.tree.leaves(batched[m][0]))


def test_shard_map_over_data():
    # All devices that split the 64 examples evenly (the test session may fake 8 CPU devices).
    n_devices = max(n for n in (8, 4, 2, 1) if n <= len(jax.devices()))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_devices]), ("data",))
    spec = jax.sharding.PartitionSpec
    x, y = _regression_data()
    model = _Regressor()
    params = jax.jit(model.init)(jax.random.key(2), x)
    tx = gradient_norm_penalty(strength=0.5, learning_rate=0.8)

    def loss_fn(p, xb, yb):
        return jnp.mean((model.apply(p, xb) - yb) ** 2)

    def sharded(p, s, xb, yb):
        def grad_fn(q):
            # Differentiate the mean over devices: with shard_map's varying-axes checks the
            # gradient for replicated parameters is already summed over devices, so a pmean
            # taken after jax.grad would leave it n_devices times too large.
            return jax.grad(lambda r: jax.lax.pmean(loss_fn(r, xb, yb), "data"))(q)

        return tx.update(grad_fn(p), s, p, penalty_grad_fn=grad_fn)

    f = jax.shard_map(
        sharded,
        mesh=mesh,
        in_specs=(spec(), spec(), spec("data"), spec("data")),
        out_specs=(spec(), spec()),
    )
    out, state = jax.jit(f)(params, tx.init(params), x, y)
    ref, _ = jax.jit(
        lambda p, s: tx.update(
            jax.grad(loss_fn)(p, x, y), s, p, penalty_grad_fn=lambda q: jax.grad(loss_fn)(q, x, y)
        )
    )(params, tx.init(params))
    assert int(state.count) == 1
    _tree_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["forward", "central", "jvp"])
def test_aux_comes_from_the_perturbed_evaluations(x64, method):
    loss, params, grads, hessian_times, _ = _quadratic()
    vector = jax.tree.map(lambda g: 0.5 * g, grads)

    def with_aux(p):  # aux: the parameters the gradient was evaluated at
        return jax.grad(loss)(p), p

    product, aux = hessian_vector_product(
        with_aux, params, vector, method=method, eps=1e-3, grads=grads, has_aux=True
    )
    _tree_allclose(product, hessian_times(vector), rtol=1e-9)
    step = 1e-3 / np.linalg.norm(ravel_pytree(vector)[0])
    if method == "forward":
        _tree_allclose(aux, _add_scaled(params, step, vector), rtol=1e-12)
    elif method == "central":
        _tree_allclose(aux[0], _add_scaled(params, step / 2, vector), rtol=1e-12)
        _tree_allclose(aux[1], _add_scaled(params, -step / 2, vector), rtol=1e-12)
    else:
        _tree_allclose(aux, params, rtol=0)
