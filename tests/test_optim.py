"""The schedule and the optimizer chain against the reference implementation's conventions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdreg.optim import learning_rate_schedule, sgd_chain


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
    """torch.optim.SGD(lr, momentum=0.9, nesterov=True, weight_decay=wd) after clip_grad_norm_."""
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
            g_np = g_np * clip / norm
        d = g_np + wd * expected
        buf = d if buf is None else momentum * buf + d
        expected = expected - lr * (d + momentum * buf)
        updates, state = tx.update({"w": g}, state, theta)
        theta = jax.tree.map(lambda p, u: p + u, theta, updates)
    np.testing.assert_allclose(theta["w"], expected, rtol=1e-6)
