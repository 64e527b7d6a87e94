"""The optimizer, schedule, clipping, noise and loss options of the reference implementation,
each against a closed form, optax's own transformation or a naive loop."""

from __future__ import annotations

import json
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import problems
import pytest
from jax.flatten_util import ravel_pytree

from gdreg.engine import objective
from gdreg.engine.fullbatch import FullBatchGradient, block_layout
from gdreg.engine.mesh import data_mesh, fetch_replicated, replicate
from gdreg.optim.chain import clip_by_global_norm, optimizer_chain
from gdreg.optim.line_search import ArmijoSettings, armijo_step
from gdreg.optim.sam import sam_gradient
from gdreg.optim.schedules import learning_rate_schedule, reference_step_milestones
from gdreg.optim.transforms import (
    add_gradient_noise,
    add_norm_bias,
    kernel_mask,
    multiply_gradient_noise,
    noise_draws,
    output_layer_mask,
    scale_by_layerwise_trust_ratio,
)
from gdreg.penalty import GradientNormPenaltyState, gradient_norm_penalty
from gdreg.program import config as config_lib
from gdreg.program import experiment, rundir
from gdreg.program.epochs import EpochPlan

ONE_STEP_EPOCHS = EpochPlan(
    mode="fullbatch", switch_after=0, steps={"fullbatch": 1, "stochastic": 1}
)


def apply(tx, grads_sequence, params):
    """Runs ``tx`` over the gradients, returning the parameters after each step."""
    state = tx.init(params)
    trajectory = []
    for grads in grads_sequence:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
    return trajectory


def tiny_params():
    """TinyBNNet's parameters: conv kernel (no bias), BatchNorm scale/bias, conv kernel and
    bias, dense kernel [4, 3] and bias."""
    return problems.init()[0]


# ----- schedules --------------------------------------------------------------------------


def old_epoch_rates(base_lr, schedule, warmup_epochs, cosine_epochs):
    """The table of gdreg.optim before the schedule family (copied), for the bitwise check."""
    last = warmup_epochs + 1 + (cosine_epochs if schedule == "warmup_cosine" else 0)
    rates = np.empty(last + 1, np.float64)
    for epoch in range(last + 1):
        if warmup_epochs and epoch <= warmup_epochs:
            rates[epoch] = base_lr * (epoch / warmup_epochs)
        elif schedule == "warmup_constant":
            rates[epoch] = base_lr
        else:
            since = epoch - warmup_epochs - 1 if warmup_epochs else epoch
            progress = min(since, cosine_epochs) / cosine_epochs
            rates[epoch] = base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return rates


@pytest.mark.parametrize("schedule", ["warmup_cosine", "warmup_constant"])
@pytest.mark.parametrize(("base", "warmup"), [(0.8, 400), (0.1, 0), (0.4, 3)])
def test_todays_schedules_are_bitwise_unchanged(x64, schedule, base, warmup):
    lr = learning_rate_schedule(
        base_lr=base, schedule=schedule, warmup_epochs=warmup, cosine_epochs=4000
    )
    steps = np.arange(4500)
    expected = old_epoch_rates(base, schedule, warmup, 4000)
    np.testing.assert_array_equal(
        np.asarray(jax.vmap(lr)(steps)), expected[np.minimum(steps, len(expected) - 1)]
    )


def exact_rates(schedule, steps, base, warmup, horizon, floor, milestones, gamma):
    """The schedule family's formula in float64 numpy, vectorized."""
    epoch = np.asarray(steps, np.float64)
    since = epoch - warmup - 1 if warmup else epoch
    low = floor * base
    progress = np.clip(since, 0, horizon) / horizon
    after = {
        "warmup_cosine": low + (base - low) * 0.5 * (1 + np.cos(np.pi * progress)),
        "warmup_linear": low + (base - low) * (1 - progress),
        "warmup_step": base * gamma ** np.sum(np.asarray(milestones)[:, None] <= since, 0),
        "warmup_exponential": base * gamma ** np.maximum(since, 0),
    }[schedule]
    return np.where(epoch <= warmup, base * epoch / max(warmup, 1), after) if warmup else after


CASES = [
    ("warmup_cosine", 0.04, 0.1),
    ("warmup_linear", 0.0, 0.1),
    ("warmup_linear", 0.25, 0.1),
    ("warmup_step", 0.0, 0.1),
    ("warmup_exponential", 0.0, 0.99),
]


@pytest.mark.parametrize(("schedule", "floor", "gamma"), CASES)
@pytest.mark.parametrize("warmup", [0, 5])
def test_schedule_family_matches_the_float64_formula(x64, schedule, floor, gamma, warmup):
    milestones = (0, 30, 30, 70) if schedule == "warmup_step" else ()
    kwargs = dict(
        base_lr=0.4,
        schedule=schedule,
        warmup_epochs=warmup,
        cosine_epochs=90,
        cosine_floor=floor,
        milestones=milestones,
        step_gamma=gamma,
        exponential_gamma=gamma,
        total_epochs=200,
    )
    steps = np.arange(200)
    expected = exact_rates(schedule, steps, 0.4, warmup, 90, floor, milestones or (0,), gamma)
    got = np.asarray(jax.vmap(learning_rate_schedule(**kwargs))(steps))
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)
    with jax.enable_x64(False):  # float32: one rounding of the float64 table
        got32 = np.asarray(jax.vmap(learning_rate_schedule(**kwargs))(jnp.asarray(steps)))
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, expected, rtol=6e-8, atol=0)


def test_step_schedule_counts_milestones_from_the_end_of_warmup():
    """MultiStepLR after GradualWarmupScheduler: the decay's epoch 0 is warmup + 1; a repeated
    milestone drops twice; the reference's "linear" milestones for 3000 epochs."""
    lr = learning_rate_schedule(
        base_lr=1.0, schedule="warmup_step", warmup_epochs=2, milestones=(3, 3), step_gamma=0.5
    )
    assert [float(lr(e)) for e in range(8)] == [0, 0.5, 1, 1, 1, 1, 0.25, 0.25]
    assert reference_step_milestones(3000) == (1124, 1874, 2626)
    config = config_lib.base_config()
    config.optim.schedule = "warmup_step"  # milestones () -> the reference's linear ones
    schedule = experiment.make_optimizer(config, ONE_STEP_EPOCHS).schedule
    drop = 400 + 1 + 1124
    assert float(schedule(drop - 1)) == pytest.approx(0.8)
    assert float(schedule(drop)) == pytest.approx(0.08)
    # The milestones count from the end of the warmup: the third (401 + 2626) lies past 3000,
    # where the table of rates ends (a run never asks for a later epoch).
    assert float(schedule(2999)) == pytest.approx(0.008)
    assert float(schedule(401 + 2626)) == float(schedule(3000)) == pytest.approx(0.008)


def test_stochastic_mode_holds_the_new_schedules_within_an_epoch():
    lr = learning_rate_schedule(
        base_lr=0.1, schedule="warmup_exponential", steps_per_epoch=10, total_epochs=50
    )
    assert float(lr(30)) == float(lr(39)) == pytest.approx(0.1 * 0.99**3)


# ----- the default chain and the optimizers ---------------------------------------------------


def test_default_config_builds_todays_chain_bitwise():
    """optim.name=sgd with every new field at its default: the chain that gdreg built before
    (clip 0.25 -> coupled weight decay -> Nesterov SGD), same state, same updates to the bit,
    and the bare penalty."""
    config = config_lib.base_config()
    config.optim.warmup_epochs = 1
    optimizer = experiment.make_optimizer(config, ONE_STEP_EPOCHS, num_classes=3)
    old = optax.chain(
        clip_by_global_norm(0.25),
        optax.add_decayed_weights(5e-4),
        optax.sgd(optimizer.schedule, momentum=0.9, nesterov=True),
    )
    params = tiny_params()
    rng = np.random.default_rng(0)
    grads = [
        jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), params) for _ in "abc"
    ]
    state_new, state_old = optimizer.tx.init(params), old.init(params)
    assert jax.tree.structure(state_new) == jax.tree.structure(state_old)
    for g in grads:
        u_new, state_new = optimizer.tx.update(g, state_new, params)
        u_old, state_old = old.update(g, state_old, params)
        for a, b in zip(jax.tree.leaves(u_new), jax.tree.leaves(u_old), strict=True):
            np.testing.assert_array_equal(a, b)
    assert isinstance(optimizer.penalty.init(params), GradientNormPenaltyState)
    assert optimizer.sam_rho is None and optimizer.line_search is None


def adam_reference(params, grads_sequence, lr, b1, b2, eps, wd, decoupled):
    """torch.optim.Adam (decoupled=False: + wd * p on the gradient) or AdamW, in numpy."""
    p = params.copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    out = []
    for t, g in enumerate(grads_sequence, start=1):
        g = g if decoupled else g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        p = p - lr * (step + wd * p) if decoupled else p - lr * step
        out.append(p)
    return out


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_and_adamw_follow_torch(x64, name):
    rng = np.random.default_rng(1)
    theta = rng.normal(size=5)
    grads = [rng.normal(size=5) for _ in range(4)]
    tx = optimizer_chain(
        1e-2, name=name, weight_decay=0.01, adam_b1=0.8, adam_b2=0.99, adam_eps=1e-6
    )
    got = apply(tx, grads, theta)
    expected = adam_reference(theta, grads, 1e-2, 0.8, 0.99, 1e-6, 0.01, name == "adamw")
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_weight_decay_linear_only_spares_biases_and_batchnorm(name):
    """With a zero gradient only the decay moves the weights: every kernel (conv and dense)
    moves, no bias and no BatchNorm scale or offset does."""
    config = config_lib.base_config()
    config.optim.update(name=name, weight_decay_linear_only=True, weight_decay=0.1)
    config.optim.update(warmup_epochs=0, schedule="warmup_constant", lr=0.5, momentum=0.0)
    tx = experiment.make_optimizer(config, ONE_STEP_EPOCHS).tx
    params = tiny_params()
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    flat_updates = dict(jax.tree_util.tree_flatten_with_path(updates)[0])
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        u = np.asarray(flat_updates[path])
        if path[-1].key == "kernel":
            assert np.all(u != 0) and np.all(np.sign(u) == -np.sign(p)), path
            if name != "adam":
                np.testing.assert_allclose(u, -0.5 * 0.1 * p, rtol=1e-6)
        else:
            assert path[-1].key in ("bias", "scale")
            np.testing.assert_array_equal(u, 0)
    assert sum(p.ndim == 1 for p in jax.tree.leaves(params)) >= 4  # biases and BatchNorm


def unitwise_norm(x):
    axes = tuple(range(x.ndim - 1)) if x.ndim > 1 else None
    return np.sqrt(np.sum(x * x, axis=axes, keepdims=x.ndim > 1))


def test_gd_agc_clips_each_unit_except_the_output_layer():
    """SGD_AGC: each output unit's gradient to at most clipping * max(||p_unit||, eps); the
    classifier (3 classes) is left as it is."""
    params = tiny_params()
    rng = np.random.default_rng(2)
    grads = jax.tree.map(lambda p: 10 * rng.normal(size=p.shape).astype(np.float32), params)
    tx = optimizer_chain(
        1.0,
        name="gd_agc",
        momentum=0.0,
        weight_decay=0.0,
        agc_clipping=0.01,
        agc_eps=1e-3,
        agc_mask=output_layer_mask(3),
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    for module in params:
        for leaf in params[module]:
            g, p = np.asarray(grads[module][leaf]), np.asarray(params[module][leaf])
            u = -np.asarray(updates[module][leaf])
            if module == "Dense_0":
                np.testing.assert_array_equal(u, g)
                continue
            bound = 0.01 * np.maximum(unitwise_norm(p), 1e-3)
            norm = unitwise_norm(g)
            expected = np.where(norm > bound, g * bound / np.maximum(norm, 1e-6), g)
            np.testing.assert_allclose(u, expected, rtol=1e-5, err_msg=f"{module}/{leaf}")
            assert not np.allclose(u, g)  # the bound is active
    mask = output_layer_mask(3)(params)
    assert not any(jax.tree.leaves(mask["Dense_0"])) and all(jax.tree.leaves(mask["Conv_0"]))


# ----- LARS and LARC ------------------------------------------------------------------------


def test_lars_without_weight_decay_is_optax_trust_ratio():
    params = tiny_params()
    rng = np.random.default_rng(3)
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    grads["Conv_1"]["bias"] = np.zeros_like(grads["Conv_1"]["bias"])  # a zero norm: ratio 1
    ours = scale_by_layerwise_trust_ratio(trust_coefficient=0.02, eps=1e-8)
    theirs = optax.scale_by_trust_ratio(trust_coefficient=0.02, eps=1e-8)
    got, _ = ours.update(grads, ours.init(params), params)
    expected, _ = theirs.update(grads, theirs.init(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def lars_reference(params, grads_sequence, lr_at, tc, eps, wd, clip, momentum):
    """The reference's LARS wrapper around torch.optim.SGD (Nesterov), in numpy: the ratio
    per array, the decay absorbed into the gradient, SGD without decay."""
    p = {k: v.copy() for k, v in params.items()}
    buf = {}
    out = []
    for t, g in enumerate(grads_sequence):
        lr = lr_at(t)
        d = {}
        for k in p:
            pn, gn = np.linalg.norm(p[k]), np.linalg.norm(g[k])
            if pn != 0 and gn != 0:
                ratio = tc * pn / (gn + pn * wd + eps)
                if clip:
                    ratio = min(ratio / lr, 1)
                d[k] = (g[k] + wd * p[k]) * ratio
            else:
                d[k] = g[k]
            buf[k] = d[k] if t == 0 else momentum * buf[k] + d[k]
            p[k] = p[k] - lr * (d[k] + momentum * buf[k])
        out.append({k: v.copy() for k, v in p.items()})
    return out


@pytest.mark.parametrize("modification", ["lars", "larc"])
def test_lars_and_larc_follow_the_reference_wrapper(x64, modification):
    rng = np.random.default_rng(4)
    # "w" is large enough for LARC's min(ratio / lr, 1) to pick 1, "b" its ratio; "z" is zero.
    params = {"w": 100 * rng.normal(size=(3, 4)), "b": rng.normal(size=4), "z": np.zeros(2)}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(3)]
    grads[1]["b"] = np.zeros(4)

    def lr_at(t):
        return 0.05 * (t + 1)

    tx = optimizer_chain(
        lambda count: 0.05 * (count + 1),
        weight_decay=5e-4,
        modification=modification,
        trust_coefficient=0.02,
        trust_eps=1e-8,
    )
    got = apply(tx, grads, params)
    expected = lars_reference(params, grads, lr_at, 0.02, 1e-8, 5e-4, modification == "larc", 0.9)
    for a, b in zip(got, expected, strict=True):
        for k in params:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-15, err_msg=k)
    ratio = {k: 0.02 * np.linalg.norm(params[k]) / np.linalg.norm(grads[0][k]) for k in "wb"}
    assert ratio["w"] / lr_at(0) > 1 > ratio["b"] / lr_at(0)


# ----- clipping -----------------------------------------------------------------------------


def test_clipping_in_the_infinity_norm(x64):
    clip = clip_by_global_norm(0.5, norm_type=math.inf)
    tree = {"a": np.array([0.3, -2.0]), "b": np.array([[1.0]])}  # max |g| = 2
    out, _ = clip.update(tree, clip.init(None))
    for k in tree:
        np.testing.assert_allclose(out[k], tree[k] * 0.5 / (2 + 1e-6), rtol=1e-15)
    small = {"a": np.array([0.3, -0.5]), "b": np.array([[0.1]])}  # max 0.5, L2 norm 0.59
    out, _ = clip.update(small, clip.init(None))
    np.testing.assert_array_equal(out["a"], small["a"])


@pytest.fixture(scope="module")
def blocks():
    params, model_state = problems.init()
    return params, model_state, block_layout(problems.NUM_IMAGES, problems.BLOCK_SIZE)


@pytest.mark.parametrize("norm_type", ["2", "inf"])
def test_batch_clip_clips_every_penalized_block_gradient_before_the_mean(blocks, norm_type):
    """The engine with make_optimizer's per-block transform (penalty, then clip) against a
    naive loop: mean over blocks of clip(penalized g_B)."""
    params, model_state, layout = blocks
    images, labels = problems.dataset()
    bare = gradient_norm_penalty(strength=0.5, learning_rate=0.1, eps=1e-2)
    penalized = []
    for block in layout:
        x, y = images[block], labels[block]
        g = jax.grad(lambda p, x=x, y=y: problems.loss_fn(p, model_state, x, y)[0])(params)
        g, _ = bare.update(
            g,
            bare.init(params),
            params,
            penalty_grad_fn=jax.grad(lambda p, x=x, y=y: problems.loss_fn(p, model_state, x, y)[0]),
        )
        penalized.append(np.asarray(ravel_pytree(g)[0], np.float64))
    order = 2 if norm_type == "2" else np.inf
    norms = np.array([np.linalg.norm(g, order) for g in penalized])
    limit = float(np.median(norms))  # about half of the blocks are clipped
    expected = np.mean(
        [g * limit / (n + 1e-6) if n > limit else g for g, n in zip(penalized, norms, strict=True)],
        axis=0,
    )
    config = config_lib.base_config()
    config.optim.update(lr=0.1, warmup_epochs=0, schedule="warmup_constant")
    config.optim.update(batch_clip=limit, clip_norm_type=norm_type)
    config.penalty.update(strength=0.5, eps=1e-2)
    penalty = experiment.make_optimizer(config, ONE_STEP_EPOCHS).penalty
    mesh = data_mesh(jax.devices()[:2])
    engine = FullBatchGradient(
        problems.loss_fn, problems.batch_fn, mesh=mesh, penalty=penalty, batchnorm_statistics="mean"
    )
    result = engine(
        replicate(params, mesh),
        replicate(model_state, mesh),
        replicate(penalty.init(params), mesh),
        replicate(problems.dataset(), mesh),
        layout,
        0,
    )
    got = ravel_pytree(fetch_replicated(result.grads))[0]
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)
    assert int(fetch_replicated(result.penalty_state)[0].count) == 1
    assert not np.allclose(got, np.mean(penalized, axis=0), rtol=1e-3)  # the clip acted
    assert 0 < np.sum(norms > limit) < len(norms)


# ----- gradient noise -----------------------------------------------------------------------


def test_gradient_noise_has_the_closed_form_mean_and_variance():
    """g + a z1, then * (1 + m z2): mean g, variance a^2 + m^2 (g^2 + a^2), over 40000 steps."""
    g = {"w": jnp.array([0.0, 0.5, -2.0, 3.0], jnp.float32)}
    a, m, draws = 0.3, 0.4, 200_000
    tx = optax.chain(add_gradient_noise(a, seed=7), multiply_gradient_noise(m, seed=7))
    state = tx.init(g)

    def at_step(count):
        return tx.update(g, tuple(s._replace(count=count) for s in state))[0]["w"]

    samples = np.asarray(jax.jit(jax.vmap(at_step))(jnp.arange(draws, dtype=jnp.int32)))
    mean, var = samples.mean(0), samples.var(0)
    g_np = np.asarray(g["w"], np.float64)
    expected_var = a**2 + m**2 * (g_np**2 + a**2)
    assert np.all(np.abs(mean - g_np) < 5 * np.sqrt(expected_var / draws))
    # The sample variance's relative standard error is sqrt((kurtosis - 1) / draws), and the
    # kurtosis of these products is below 4.6: five standard errors.
    np.testing.assert_allclose(var, expected_var, rtol=5 * np.sqrt(3.6 / draws))
    assert not np.allclose(var, a**2 + m**2 * g_np**2, rtol=0.05)  # the a^2 m^2 term is there


def test_gradient_noise_is_drawn_from_seed_and_step_only():
    """The same (seed, step) gives the same draw, in any process and after a resume: the
    state holds only the step count. Another step, seed or kind draws other noise."""
    g = {"w": jnp.ones((3, 2)), "b": jnp.zeros(5)}
    tx = optax.chain(add_gradient_noise(0.1, seed=3), multiply_gradient_noise(0.2, seed=3))
    state = tx.init(g)
    straight = []
    for _ in range(5):
        updates, state = tx.update(g, state)
        straight.append(ravel_pytree(updates)[0])
    # A resume: the state of step 3, checkpointed as host arrays, continues the same way.
    state = tuple(s._replace(count=np.int32(3)) for s in tx.init(g))
    for step in (3, 4):
        updates, state = tx.update(g, state)
        np.testing.assert_array_equal(ravel_pytree(updates)[0], straight[step])
    assert not np.allclose(straight[0], straight[1])
    other_seed = optax.chain(add_gradient_noise(0.1, seed=4), multiply_gradient_noise(0.2, seed=4))
    first_other = ravel_pytree(other_seed.update(g, other_seed.init(g))[0])[0]
    assert not np.allclose(first_other, straight[0])
    from gdreg.optim.transforms import ADDITIVE_NOISE_STREAM, MULTIPLICATIVE_NOISE_STREAM

    z_add = ravel_pytree(noise_draws(3, ADDITIVE_NOISE_STREAM, 0, g))[0]
    z_mul = ravel_pytree(noise_draws(3, MULTIPLICATIVE_NOISE_STREAM, 0, g))[0]
    assert not np.allclose(z_add, z_mul)


# ----- norm bias ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("target", [0.5, 10.0])  # below and above ||theta||
def test_norm_bias_adds_the_gradient_of_its_term(x64, norm, target):
    rng = np.random.default_rng(5)
    params = {"w": rng.normal(size=(2, 3)), "b": rng.normal(size=3)}
    grads = {"w": rng.normal(size=(2, 3)), "b": rng.normal(size=3)}
    strength = 0.3

    def term(p):
        d = optax.tree.norm(p, squared=True) - target**2
        return strength * jnp.abs(d) if norm == 1 else strength / 2 * d**2

    tx = add_norm_bias(strength, norm=norm, target=target)
    got, _ = tx.update(grads, tx.init(params), params)
    bias_grad = jax.grad(term)(params)
    for k in params:
        np.testing.assert_allclose(got[k], grads[k] + bias_grad[k], rtol=1e-13)
    if norm == 2:  # the reference's formula, written out: + 2 * strength * d * theta
        d = sum(np.sum(v**2) for v in params.values()) - target**2
        np.testing.assert_allclose(
            got["b"], grads["b"] + 2 * strength * d * params["b"], rtol=1e-13
        )


# ----- label smoothing ----------------------------------------------------------------------


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(5)(x)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_is_the_references_cross_entropy(x64, smoothing):
    """-(1 - s) log p_y - s / (K - 1) sum_{k != y} log p_k, through make_loss_fn's model."""
    model = Linear()
    rng = np.random.default_rng(6)
    inputs = rng.normal(size=(7, 4))
    labels = rng.integers(0, 5, 7).astype(np.int32)
    params = model.init(jax.random.key(0), inputs)["params"]
    loss_fn = objective.make_loss_fn(model, label_smoothing=smoothing)
    loss, (state, aux) = loss_fn(params, {}, inputs, labels)
    logits = np.asarray(model.apply({"params": params}, inputs))
    log_p = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
    weights = np.full_like(log_p, smoothing / 4)
    weights[np.arange(7), labels] = 1 - smoothing
    np.testing.assert_allclose(loss, np.mean(-np.sum(weights * log_p, -1)), rtol=1e-12)
    assert state == {} and 0 <= float(aux["accuracy"]) <= 1


# ----- SAM and the line search --------------------------------------------------------------

A = np.array([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.4]])
B = np.array([1.0, -2.0, 0.5])


def quadratic_loss(x):
    return 0.5 * x @ A @ x - B @ x


def quadratic_gradient(x):
    return A @ x - B


def test_sam_gradient_is_the_gradient_after_the_normalized_ascent_step(x64):
    x = np.array([0.3, 0.1, -1.0])
    calls = []

    def gradient_fn(p):
        calls.append(p)
        return jnp.asarray(quadratic_gradient(np.asarray(p)))

    g = quadratic_gradient(x)
    expected = g + 0.05 * A @ g / (np.linalg.norm(g) + 1e-12)
    np.testing.assert_allclose(sam_gradient(gradient_fn, x, 0.05), expected, rtol=1e-14)
    assert len(calls) == 2
    np.testing.assert_allclose(sam_gradient(gradient_fn, x, 0.05, grads=g), expected, rtol=1e-14)
    assert len(calls) == 3  # the given gradient saves the first evaluation
    with_aux = sam_gradient(lambda p: (gradient_fn(p), "aux"), x, 0.05, has_aux=True)
    np.testing.assert_allclose(with_aux[0], expected, rtol=1e-14)
    assert with_aux[1] == "aux"


def test_sam_step_equals_optax_contrib_sam(x64):
    """SGD on sam_gradient is optax.contrib.sam(sgd, normalize -> sgd(rho)) in opaque mode."""
    x = {"x": jnp.array([0.3, 0.1, -1.0])}

    def grad_fn(p, _=0):
        return {"x": jnp.asarray(A) @ p["x"] - jnp.asarray(B)}

    sam = optax.contrib.sam(
        optax.sgd(0.1), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), opaque_mode=True
    )
    updates, _ = sam.update(grad_fn(x), sam.init(x), x, grad_fn=grad_fn)
    ours = sam_gradient(grad_fn, x, 0.05)
    np.testing.assert_allclose(x["x"] - 0.1 * ours["x"], x["x"] + updates["x"], rtol=1e-11)


def test_armijo_takes_the_largest_step_the_closed_form_allows(x64):
    """For updates = -g on 1/2 x^T A x - b^T x: eta <= 2 (1 - c) ||g||^2 / g^T A g."""
    x = np.array([2.0, -1.0, 3.0])
    g = quadratic_gradient(x)
    settings = ArmijoSettings(slope_rtol=0.3, decrease_factor=0.5, max_backtracking_steps=25)
    limit = 2 * (1 - 0.3) * (g @ g) / (g @ A @ g)
    k = int(np.ceil(np.log(limit / 4.0) / np.log(0.5)))  # first 4 * 0.5^k <= limit
    result = armijo_step(quadratic_loss, x, -g, g, learning_rate=4.0, settings=settings)
    assert result.step_size == 4.0 * 0.5**k and 0 < k < 25
    np.testing.assert_allclose(result.params, x - result.step_size * g, rtol=1e-15)
    assert result.value == pytest.approx(float(quadratic_loss(result.params)), rel=1e-14)
    assert result.evaluations == k + 2  # the value at x, then k + 1 trials
    given = armijo_step(
        quadratic_loss, x, -g, g, learning_rate=4.0, value=quadratic_loss(x), settings=settings
    )
    assert given.step_size == result.step_size and given.evaluations == k + 1


@pytest.mark.parametrize(("lr", "steps"), [(0.1, 15), (5.0, 15), (50.0, 2)])
def test_armijo_equals_optax_backtracking_linesearch(x64, lr, steps):
    """Along SGD's update: the first step accepted, a few halvings, and none accepted (the
    last one tried is taken), as optax.scale_by_backtracking_linesearch decides."""
    x = jnp.array([2.0, -1.0, 3.0])

    def loss(p):
        return 0.5 * p @ jnp.asarray(A) @ p - jnp.asarray(B) @ p

    g = jax.grad(loss)(x)
    updates = -lr * g
    search = optax.scale_by_backtracking_linesearch(
        max_backtracking_steps=steps, slope_rtol=1e-4, decrease_factor=0.5, increase_factor=1.0
    )
    scaled, state = search.update(updates, search.init(x), x, value=loss(x), grad=g, value_fn=loss)
    settings = ArmijoSettings(slope_rtol=1e-4, decrease_factor=0.5, max_backtracking_steps=steps)
    result = armijo_step(loss, x, updates, g, settings=settings)
    assert result.step_size == pytest.approx(float(state.learning_rate), rel=1e-15)
    np.testing.assert_allclose(result.params, x + scaled, rtol=1e-14)


def test_armijo_takes_no_step_into_a_non_finite_loss(x64):
    x = np.array([1.0, 1.0, 1.0])
    g = quadratic_gradient(x)
    settings = ArmijoSettings(max_backtracking_steps=3)
    result = armijo_step(lambda p: np.inf, x, -g, g, value=1.0, settings=settings)
    assert result.step_size == 0.0 and result.value == 1.0 and result.evaluations == 4
    np.testing.assert_array_equal(result.params, x)


# ----- the config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("optim.name", "lbfgs"),
        ("optim.modification", "lamb"),
        ("optim.clip_norm_type", "1"),
        ("optim.batch_clip", -1.0),
        ("optim.adam_b2", 1.0),
        ("optim.agc_clipping", 0.0),
        ("optim.trust_coefficient", 0.0),
        ("optim.sam_rho", 0.0),
        ("optim.grad_noise_additive", -0.1),
        ("optim.grad_noise_multiplicative", -0.1),
        ("optim.line_search", "wolfe"),
        ("optim.line_search_decrease", 1.0),
        ("optim.milestones", (10, -1)),
        ("optim.step_gamma", 0.0),
        ("optim.cosine_floor", 1.5),
        ("loss.label_smoothing", 1.0),
        ("loss.norm_bias", -1.0),
        ("loss.norm_bias_norm", 3),
    ],
)
def test_validate_names_the_bad_new_field(field, value):
    config = config_lib.base_config()
    config_lib.set_field(config, field, value)
    with pytest.raises(config_lib.ConfigError, match=re.escape(field)):
        experiment.validate(config)


NEW_OPTIM_FIELDS = [
    "name",
    "modification",
    "clip_norm_type",
    "batch_clip",
    "weight_decay_linear_only",
    "adam_b1",
    "adam_b2",
    "adam_eps",
    "agc_clipping",
    "agc_eps",
    "trust_coefficient",
    "trust_eps",
    "sam_rho",
    "grad_noise_additive",
    "grad_noise_multiplicative",
    "line_search",
    "line_search_slope",
    "line_search_decrease",
    "line_search_steps",
    "milestones",
    "step_gamma",
    "exponential_gamma",
    "cosine_floor",
]


def test_a_run_from_before_these_fields_resumes_unchanged(tmp_path):
    config = config_lib.base_config()
    saved = json.loads(config.to_json_best_effort())
    del saved["loss"]
    for field in NEW_OPTIM_FIELDS:
        del saved["optim"][field]
    (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps(saved))
    old = rundir.read_config(str(tmp_path))
    assert config_lib.resume_changes(old, config_lib.base_config(), allow=False) == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("optim.name", "adamw"),
        ("optim.modification", "lars"),
        ("optim.weight_decay_linear_only", True),
        ("optim.batch_clip", 0.5),
        ("optim.grad_noise_additive", 0.01),
        ("optim.grad_noise_multiplicative", 0.01),
        ("loss.norm_bias", 0.1),
    ],
)
def test_resume_refuses_a_change_of_the_optimizer_state(field, value):
    new = config_lib.base_config()
    config_lib.set_field(new, field, value)
    with pytest.raises(
        config_lib.ConfigError, match=rf"cannot resume with another {re.escape(field)}"
    ):
        config_lib.resume_changes(config_lib.base_config(), new, allow=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("optim.clip_norm_type", "inf"),
        ("loss.label_smoothing", 0.1),
        ("optim.schedule", "warmup_step"),
    ],
)
def test_resume_allows_a_result_change_only_when_asked(field, value):
    new = config_lib.base_config()
    config_lib.set_field(new, field, value)
    with pytest.raises(config_lib.ConfigError, match="allow_config_change"):
        config_lib.resume_changes(config_lib.base_config(), new, allow=False)
    assert field in config_lib.resume_changes(config_lib.base_config(), new, allow=True)


def test_training_longer_needs_permission_when_the_milestones_follow_the_epochs():
    """warmup_step without milestones places them at 3/8, 5/8, 7/8 of train.epochs: another
    length changes the rates of epochs already planned, so it is a change of the result."""
    saved = config_lib.base_config()
    saved.optim.schedule = "warmup_step"
    longer = config_lib.base_config()
    longer.optim.schedule = "warmup_step"
    longer.train.epochs = 4000
    with pytest.raises(config_lib.ConfigError, match=r"train\.epochs"):
        config_lib.resume_changes(saved, longer, allow=False)
    saved.optim.milestones = longer.optim.milestones = (100, 200)
    assert config_lib.resume_changes(saved, longer, allow=False) == {"train.epochs": (3000, 4000)}


def tiny_config():
    config = problems.tiny_run_config()
    config.train.update(epochs=4, block_size=32)
    config.optim.update(warmup_epochs=0, lr=0.1)
    return config


def test_a_run_with_every_knob_on_takes_a_finite_step():
    """AdamW with LARC, clipping in the infinity norm, per-block clipping after the penalty,
    both noises, weight decay on kernels only, label smoothing, norm bias, a step schedule:
    the engine and the chain work together and the parameters move."""
    config = tiny_config()
    config.optim.update(
        name="adamw",
        modification="larc",
        clip_norm_type="inf",
        clip_norm=0.05,
        batch_clip=0.5,
        grad_noise_additive=1e-3,
        grad_noise_multiplicative=0.1,
        weight_decay_linear_only=True,
        schedule="warmup_step",
        milestones=(1,),
    )
    config.loss.update(label_smoothing=0.1, norm_bias=1e-4, norm_bias_norm=2, norm_bias_target=1.0)
    run = experiment.build(config)
    state = experiment.initial_state(run)
    params = replicate(state.params, run.mesh)
    layout = run.epoch_layouts(0)[0]
    result = run.engine(
        params,
        replicate(state.model_state, run.mesh),
        replicate(state.penalty_state, run.mesh),
        run.train_data,
        layout,
        0,
    )
    updates, _ = run.optimizer.tx.update(result.grads, replicate(state.opt_state, run.mesh), params)
    new = fetch_replicated(optax.apply_updates(params, updates))
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state.params), strict=True)
    ]
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(new)) and all(moved)
    assert len(fetch_replicated(result.penalty_state)) == 2  # (penalty, batch clip)


def test_kernel_mask_marks_only_kernels():
    mask = kernel_mask(tiny_params())
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    assert {path[-1].key for path, m in flat if m} == {"kernel"}
    assert {path[-1].key for path, m in flat if not m} == {"bias", "scale"}


def test_a_resumed_run_with_the_knobs_on_equals_the_uninterrupted_run(tmp_path):
    """Checkpoints hold the new optimizer and penalty states (step counts, masks, the penalty
    with per-block clipping): two epochs, then a resume to four, equal four epochs bitwise,
    the gradient noise included."""
    import orbax.checkpoint as ocp

    from gdreg.program import loop as train

    def config(epochs):
        config = tiny_config()
        config.train.epochs = epochs
        config.checkpoint.every_epochs = 2
        config.eval.every_epochs = 2
        config.optim.update(
            name="adamw",
            modification="larc",
            lr=0.01,
            batch_clip=1.0,
            grad_noise_additive=1e-3,
            grad_noise_multiplicative=0.1,
            weight_decay_linear_only=True,
            schedule="warmup_exponential",
        )
        config.loss.update(label_smoothing=0.1, norm_bias=1e-4)
        return config

    train.train_and_evaluate(config(4), str(tmp_path / "whole"))
    train.train_and_evaluate(config(2), str(tmp_path / "resumed"))
    train.train_and_evaluate(config(4), str(tmp_path / "resumed"))

    def final_state(name):
        path = tmp_path / name / rundir.CHECKPOINT_DIR
        with ocp.CheckpointManager(str(path)) as manager:
            return jax.tree.map(np.asarray, manager.restore(4, args=ocp.args.StandardRestore()))

    whole, resumed = final_state("whole"), final_state("resumed")
    jax.tree.map(np.testing.assert_array_equal, whole, resumed)
    losses = [r["train_loss"] for r in rundir.read_metrics(tmp_path / "resumed")]
    assert len(losses) == 4 and all(np.isfinite(losses))
