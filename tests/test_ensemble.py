"""Ensemble (trajectory) entropy: known per-coordinate variances around a linear drift."""

import math

import numpy as np
import pytest
import torch
from scipy.special import digamma, polygamma

from pipeline.estimators.ensemble import (
    ensemble_entropy,
    ensemble_entropy_per_param,
    window_frozen_count,
    window_log_var_sum,
)


def _window(n=4000, n_t=100, seed=0, offset=0.0):
    """Checkpoints theta_i(t) = offset + a_i + b_i t + sqrt(v_i) z, steps 1000..1000+10(n_t-1)."""
    g = np.random.default_rng(seed)
    v = np.exp(g.uniform(np.log(1e-6), np.log(1e-2), n))
    a, b = g.normal(0, 1, n) + offset, g.normal(0, 1e-3, n)
    steps = 1000.0 + 10.0 * np.arange(n_t)
    theta = a + b * steps[:, None] + np.sqrt(v) * g.standard_normal((n_t, n))
    return steps, theta.astype(np.float32), v


def _rows(theta, cols=slice(None)):
    """One tensor per checkpoint (the window's blocks as the measure stage holds them)."""
    return [torch.from_numpy(np.ascontiguousarray(row[cols])) for row in theta]


def test_known_variance_recovered():
    steps, theta, v = _window()
    n, k = v.size, len(steps) - 2
    lvs = window_log_var_sum(_rows(theta), steps)
    # E[ln s^2] = ln v + psi(k/2) - ln(k/2) exactly for Gaussian residuals with k dof.
    expected = np.log(v).sum() + n * (digamma(k / 2) - math.log(k / 2))
    sd = math.sqrt(n * polygamma(1, k / 2))
    assert abs(lvs - expected) < 4 * sd
    # Per-parameter entropy vs the true Gaussian entropy: bias ~ -1/(2k) = -0.005 nats.
    true_h = 0.5 * (math.log(2 * math.pi * math.e) + np.log(v).mean())
    assert abs(ensemble_entropy_per_param(lvs, n) - true_h) < 0.01
    assert ensemble_entropy(lvs, n) == pytest.approx(n * ensemble_entropy_per_param(lvs, n))
    assert window_frozen_count(_rows(theta), steps) == 0


def test_additive_over_row_blocks():
    """Column slices of the window sum to the whole; chunk=1024 puts chunk boundaries off the
    slice boundaries, so the chunk loop and its reused buffers are exercised too."""
    steps, theta, _ = _window(n=3000, n_t=20, seed=1)
    whole = window_log_var_sum(_rows(theta), steps, chunk=1024)
    parts = sum(
        window_log_var_sum(_rows(theta, slice(a, a + 1000)), steps, chunk=1024)
        for a in (0, 1000, 2000)
    )
    assert parts == pytest.approx(whole, rel=1e-6)  # fp32 per-chunk log sums (METHODS.md: ~1e-7)


def test_no_cancellation_far_from_zero():
    """Weights near 100 with fluctuations of 1e-3 to 1e-1: fp32 quantisation (ulp 7.6e-6)
    is the only loss; per-parameter entropy within 0.002 nats of the truth plus the known
    small-sample bias 0.5 (psi(k/2) - ln(k/2)) (= -0.0087 nats at k = 58)."""
    steps, theta, v = _window(n=2000, n_t=60, seed=2, offset=100.0)
    keep, k = v > 1e-6, len(steps) - 2
    lvs = window_log_var_sum(_rows(theta[:, keep]), steps)
    true_h = 0.5 * (math.log(2 * math.pi * math.e) + np.log(v[keep]).mean())
    bias = 0.5 * (digamma(k / 2) - math.log(k / 2))
    assert abs(ensemble_entropy_per_param(lvs, keep.sum()) - true_h - bias) < 0.002


def test_frozen_and_linear_coordinates_excluded():
    steps = np.arange(10.0)
    theta = np.zeros((10, 4), np.float32)
    theta[:, 1] = 0.5  # constant (e.g. a norm gain)
    theta[:, 2] = 3.0 + 0.25 * steps  # exactly linear drift
    theta[:, 3] = np.random.default_rng(3).normal(0, 0.1, 10)
    theta[:, 0] = 0.0
    assert window_frozen_count(_rows(theta), steps) == 3
    lvs = window_log_var_sum(_rows(theta), steps)
    assert np.isfinite(lvs)
    # Only coordinate 3 contributes: its own ln Var (numpy fp64 line fit, 8 dof).
    resid = theta[:, 3] - np.polyval(np.polyfit(steps, theta[:, 3].astype(float), 1), steps)
    assert lvs == pytest.approx(math.log((resid**2).sum() / 8), rel=1e-5)


def test_too_few_checkpoints():
    with pytest.raises(ValueError):
        window_log_var_sum(_rows(np.ones((2, 3), np.float32)), np.arange(2.0))
    with pytest.raises(ValueError):
        window_frozen_count(_rows(np.ones((2, 3), np.float32)), np.arange(2.0))


def test_window_statistics_returns_both_in_one_pass():
    from pipeline.estimators.ensemble import (
        window_frozen_count,
        window_log_var_sum,
        window_statistics,
    )

    rng = np.random.default_rng(3)
    steps = np.arange(10) * 5.0
    theta = rng.normal(size=(10, 50)) * 0.1
    theta[:, :4] = 0.25  # constant (e.g. bias init): frozen
    values = [torch.from_numpy(r.copy()) for r in theta]
    lv, frozen = window_statistics(values, steps)
    assert frozen == window_frozen_count(values, steps) == 4
    assert lv == window_log_var_sum(values, steps)


def test_fast_path_skips_the_frozen_test_only_when_no_coordinate_can_be_frozen():
    """``_none_frozen`` (the cheap bound) lets a chunk skip the per-coordinate frozen test; the
    result must equal the exact test's whatever the chunk: a chunk of random-walk coordinates
    takes the fast path, a chunk holding one constant or one exactly linear coordinate (or one
    whose fluctuation is at the fp32 resolution of a large value) takes the exact one."""
    from pipeline.estimators import ensemble

    steps, theta, _ = _window(n=512, n_t=8, seed=5)
    flat = [torch.from_numpy(r.copy()) for r in theta]
    incs = torch.stack([b - a for a, b in zip(flat, flat[1:])])
    chunks = list(ensemble._window_chunks(incs, range(7), steps, flat[0], chunk=512))
    assert all(frozen is None for _, frozen in chunks)  # nothing near frozen: fast path
    fast = window_log_var_sum(flat, steps)
    for special in (
        np.full(8, 0.5, np.float32),  # constant
        (3.0 + 0.25 * (steps - steps[0])).astype(np.float32),  # exactly linear
        np.float32(1e4) + np.float32(1e-4) * np.arange(8, dtype=np.float32) ** 2,  # fp32 floor
    ):
        with_one = theta.copy()
        with_one[:, 7] = special
        rows = [torch.from_numpy(r.copy()) for r in with_one]
        incs = torch.stack([b - a for a, b in zip(rows, rows[1:])])
        ((_, frozen),) = ensemble._window_chunks(incs, range(7), steps, rows[0], chunk=512)
        assert frozen is not None and bool(frozen[7])  # the exact test ran and caught it
        assert window_frozen_count(rows, steps) == 1
        # the other coordinates' sum is unchanged by the path taken (to fp32 rounding)
        others = window_log_var_sum([r[:7] for r in rows], steps) + window_log_var_sum(
            [r[8:] for r in rows], steps
        )
        assert window_log_var_sum(rows, steps) == pytest.approx(others, rel=1e-6)
    assert fast == pytest.approx(
        window_log_var_sum([r[:256] for r in flat], steps)
        + window_log_var_sum([r[256:] for r in flat], steps),
        rel=1e-6,
    )
