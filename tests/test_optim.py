"""The schedule and the optimizer chain against the reference implementation's conventions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdreg.optim.chain import clip_by_global_norm, sgd_chain
from gdreg.optim.schedules import learning_rate_schedule


def reference_lr(epoch, base, warmup, horizon):
    """GradualWarmupScheduler(multiplier=1) around CosineAnnealingLR, written out by hand."""
    if epoch <= warmup:
        return base * epoch / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (epoch - warmup - 1) / horizon))


@pytest.mark.parametrize(
    ("base", "warmup", "horizon", "epochs"), [(0.8, 400, 4000, 3000), (0.1, 5, 300, 300)]
)
def test_warmup_cosine_matches_the_reference_schedule(base, warmup, horizon, epochs):
    schedule = learning_rate_schedule(base_lr=base, warmup_epochs=warmup, cosine_epochs=horizon)
    steps = np.arange(epochs)
    got = np.asarray(jax.vmap(schedule)(jnp.asarray(steps)))
    expected = [reference_lr(int(k), base, warmup, horizon) for k in steps]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert got[0] == 0 and got[warmup] == pytest.approx(base)


def exact_rates(steps, base, warmup, horizon):
    """The schedule's formula in float64 numpy, vectorized (an independent evaluation)."""
    epoch = np.asarray(steps, np.float64)
    warm = base * epoch / max(warmup, 1)
    since = np.clip(epoch - warmup - 1 if warmup else epoch, 0, horizon)
    cosine = base * 0.5 * (1 + np.cos(np.pi * since / horizon))
    return np.where(epoch <= warmup, warm if warmup else cosine, cosine)


@pytest.mark.parametrize(("base", "warmup"), [(0.8, 400), (0.4, 0), (0.8, 2), (0.1, 5)])
def test_schedule_is_within_1e7_of_the_exact_rate_at_every_step(base, warmup):
    """Every rate of a 3000-step run (cosine-4000) within 1e-7 relative of the float64 value."""
    schedule = learning_rate_schedule(base_lr=base, warmup_epochs=warmup, cosine_epochs=4000)
    steps = np.arange(3001)
    got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32)), np.float64)
    expected = exact_rates(steps, base, warmup, 4000)
    nonzero = expected != 0
    assert np.all(got[~nonzero] == 0)
    assert np.max(np.abs(got[nonzero] / expected[nonzero] - 1)) < 1e-7


def test_schedule_in_float64_is_exact(x64):
    schedule = learning_rate_schedule(base_lr=0.8, warmup_epochs=400, cosine_epochs=4000)
    steps = np.arange(3001)
    got = np.asarray(jax.vmap(schedule)(jnp.asarray(steps)))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, exact_rates(steps, 0.8, 400, 4000), rtol=1e-15, atol=0)


def test_clipping_divides_by_the_norm_plus_1e6_only_above_the_limit(x64):
    """The reference's rule: g * c / (||g|| + 1e-6) when ||g|| > c, else g unchanged."""
    clip = clip_by_global_norm(0.25)
    state = clip.init(None)
    big = {"a": np.array([3.0, 0.0]), "b": np.array([[-4.0]])}  # norm 5
    out, _ = clip.update(big, state)
    np.testing.assert_allclose(out["a"], big["a"] * 0.25 / (5 + 1e-6), rtol=1e-15)
    np.testing.assert_allclose(out["b"], big["b"] * 0.25 / (5 + 1e-6), rtol=1e-15)
    assert not np.allclose(out["a"], big["a"] * 0.25 / 5, rtol=1e-8, atol=0)  # not optax's
    small = {"a": np.array([0.1, 0.0]), "b": np.array([[-0.2]])}  # norm 0.2236 <= 0.25
    out, _ = clip.update(small, state)
    np.testing.assert_array_equal(out["a"], small["a"])
    at_limit = {"a": np.array([0.25, 0.0]), "b": np.array([[0.0]])}
    np.testing.assert_array_equal(clip.update(at_limit, state)[0]["a"], at_limit["a"])
    with pytest.raises(ValueError, match="max_norm must be positive"):
        clip_by_global_norm(0.0)


def test_cosine_4000_ends_a_3000_step_run_at_27_percent():
    schedule = learning_rate_schedule(base_lr=0.8, warmup_epochs=400, cosine_epochs=4000)
    assert float(schedule(2999)) == pytest.approx(0.219, abs=5e-4)


def test_stochastic_schedule_is_constant_within_an_epoch():
    schedule = learning_rate_schedule(
        base_lr=0.1, warmup_epochs=5, cosine_epochs=300, steps_per_epoch=390
    )
    assert float(schedule(390 * 3)) == float(schedule(390 * 3 + 389)) == pytest.approx(0.06)
    assert float(schedule(390 * 4)) == pytest.approx(0.08)


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match=r"^base_lr must be positive"):
        learning_rate_schedule(base_lr=-1.0, warmup_epochs=1, cosine_epochs=10)
    with pytest.raises(ValueError, match=r"^schedule must be one of"):
        learning_rate_schedule(base_lr=1.0, schedule="step", cosine_epochs=10)


def test_chain_equals_torch_sgd_with_clipping_and_coupled_weight_decay():
    """torch.optim.SGD(lr, momentum=0.9, nesterov=True, weight_decay=wd) after the reference's
    clipping (clip_grad_norm_'s rule, with its 1e-6)."""
    lr, wd, clip, momentum = 0.3, 5e-4, 0.25, 0.9
    tx = sgd_chain(lr, momentum=momentum, nesterov=True, weight_decay=wd, clip_norm=clip)
    theta = {"w": jnp.array([1.0, -2.0, 0.5])}
    state = tx.init(theta)
    grads = [jnp.array([3.0, 0.0, -4.0]), jnp.array([0.01, 0.02, -0.01])]
    expected, buf = np.array([1.0, -2.0, 0.5]), None
    for g in grads:
        g_np = np.asarray(g)
        norm = np.linalg.norm(g_np)
        if norm > clip:
            g_np = g_np * clip / (norm + 1e-6)
        d = g_np + wd * expected
        buf = d if buf is None else momentum * buf + d
        expected = expected - lr * (d + momentum * buf)
        updates, state = tx.update({"w": g}, state, theta)
        theta = jax.tree.map(lambda p, u: p + u, theta, updates)
    np.testing.assert_allclose(theta["w"], expected, rtol=1e-6)


def test_chain_equals_the_reference_rule_in_float64(x64):
    lr, wd, clip, momentum = 0.3, 5e-4, 0.25, 0.9
    tx = sgd_chain(lr, momentum=momentum, nesterov=True, weight_decay=wd, clip_norm=clip)
    theta = {"w": np.array([1.0, -2.0, 0.5])}
    state = tx.init(theta)
    expected, buf = theta["w"].copy(), None
    for g in (np.array([3.0, 0.0, -4.0]), np.array([0.01, 0.02, -0.01])):
        norm = np.linalg.norm(g)
        clipped = g * clip / (norm + 1e-6) if norm > clip else g
        d = clipped + wd * expected
        buf = d if buf is None else momentum * buf + d
        expected = expected - lr * (d + momentum * buf)
        updates, state = tx.update({"w": g}, state, theta)
        theta = jax.tree.map(lambda p, u: p + u, theta, updates)
    np.testing.assert_allclose(theta["w"], expected, rtol=1e-14)


def test_the_table_of_rates_ends_with_the_run():
    """A warmup or decay of 10**9 epochs in a 6-epoch run: the table holds the run's epochs
    (it used to hold all 10**9, built in Python: it never finished), with the same rates."""
    cases = [
        ({"warmup_epochs": 10**9, "cosine_epochs": 40}, lambda e: 0.8 * e / 10**9),
        ({"cosine_epochs": 10**9}, lambda e: 0.4 * (1 + math.cos(math.pi * e / 10**9))),
    ]
    for far, rate in cases:
        schedule = learning_rate_schedule(base_lr=0.8, total_epochs=6, **far)
        got = [float(schedule(epoch)) for epoch in range(7)]
        np.testing.assert_allclose(got, [rate(epoch) for epoch in range(7)], rtol=1e-6)
        assert float(schedule(10**6)) == got[6]  # past the table: its last rate
