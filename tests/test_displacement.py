"""Estimator-level tests for pipeline.estimators.displacement (fast, synthetic known answers)."""

import numpy as np
import pytest
import torch

from pipeline.estimators.displacement import (
    diffusivity_from_band,
    rounding_noise_var,
    sq_distance_band,
    temperature_from_diffusivity,
    window_learning_rate,
)

WINDOW = 8


def _band(positions: np.ndarray, max_lag: int) -> np.ndarray:
    """Band from an (n_ckpt, n_params) trajectory via sq_distance_band, in checkpoint order."""
    d2 = np.full((len(positions), max_lag), np.nan)
    previous = []
    for t, row in enumerate(positions):
        cur = torch.from_numpy(row.astype(np.float32))
        if previous:
            d2[t, : len(previous)] = sq_distance_band(cur, previous)
        previous = ([cur] + previous)[:max_lag]
    return d2


def _band_from_cov(cov: np.ndarray, max_lag: int) -> np.ndarray:
    """Expected band of a zero-mean process with covariance ``cov`` between checkpoints."""
    var = np.diag(cov)
    dist = var[:, None] + var[None, :] - 2 * cov
    d2 = np.full((cov.shape[0], max_lag), np.nan)
    for t in range(cov.shape[0]):
        for k in range(1, min(t, max_lag) + 1):
            d2[t, k - 1] = dist[t, t - k]
    return d2


def _ar1_cov(kappas, steps, noise_var=1.0):
    """Stationary covariance, summed over directions, of x <- (1-kappa) x + noise per step."""
    lag = np.abs(np.subtract.outer(steps, steps)).astype(float)
    return sum(noise_var / (1 - (1 - k) ** 2) * (1 - k) ** lag for k in kappas)


def test_sq_distance_band_matches_float64_and_skips_nonfinite():
    g = torch.Generator().manual_seed(0)
    cur = torch.randn(300, 700, generator=g)
    prev = [cur + 0.01 * k * torch.randn(300, 700, generator=g) for k in (1, 2, 3)]
    got = sq_distance_band(cur, prev)
    want = [float(((cur.double() - p.double()) ** 2).sum()) for p in prev]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # bf16 storage: upcast exactly, same answer as the fp32 upcast computed in fp64
    cb, pb = cur.bfloat16(), prev[0].bfloat16()
    want_bf = float(((cb.double() - pb.double()) ** 2).sum())
    np.testing.assert_allclose(sq_distance_band(cb, [pb]), [want_bf], rtol=1e-5)
    # non-finite elements are excluded from the sum
    bad = cur.clone()
    bad[0, :5] = float("nan")
    bad[1, 0] = float("inf")
    mask = torch.isfinite(bad)
    want_nan = float(((cur.double() - prev[0].double())[mask] ** 2).sum())
    np.testing.assert_allclose(sq_distance_band(bad, prev[:1]), [want_nan], rtol=1e-5)


def test_brownian_plus_drift_uneven_steps_recovers_d_drift_and_error():
    """Brownian motion (D = 4e-6 / step) plus a strong constant velocity, uneven spacing."""
    rng = np.random.default_rng(1)
    n, d_true = 400, 4e-6
    steps = np.cumsum(rng.integers(5, 40, size=161))
    steps -= steps[0]
    velocity = rng.standard_normal(n) * 3e-4  # |v|^2/n = 9e-8 / step^2: drift >> noise at lag 8
    incr = rng.standard_normal((steps.size - 1, n)) * np.sqrt(d_true * np.diff(steps))[:, None]
    pos = np.vstack([np.zeros(n), np.cumsum(incr, axis=0)]) + steps[:, None] * velocity
    res = diffusivity_from_band(steps, _band(pos, WINDOW), n, WINDOW)
    d = res["diffusivity"]
    assert np.all(np.isnan(d[:WINDOW])) and np.all(np.isfinite(d[WINDOW:]))
    assert abs(np.mean(d[WINDOW:]) / d_true - 1) < 0.03
    # error bar calibration on non-overlapping windows: z-scores have unit spread
    idx = np.arange(WINDOW, steps.size, WINDOW)
    z = (d[idx] - d_true) / res["diffusivity_err"][idx]
    assert 0.6 < np.std(z) < 1.6
    speed2 = np.mean(res["drift_speed2"][WINDOW:])
    assert abs(speed2 / np.mean(velocity**2) - 1) < 0.05
    assert np.mean(res["identifiable"][WINDOW:]) > 0.9


def test_mean_reversion_bias_removed_when_resolved_and_flagged_when_not():
    """Exact expected bands of AR(1) directions (no sampling noise)."""
    steps = np.arange(WINDOW + 1) * 100
    n = 60
    # two decades of relaxation rates, kappa * spacing up to 0.5: bias < 1%
    kappas = np.logspace(-2, 0, n) * 0.5 / 100
    res = diffusivity_from_band(steps, _band_from_cov(_ar1_cov(kappas, steps), WINDOW), n, WINDOW)
    assert abs(res["diffusivity"][-1] - 1) < 0.01 and res["identifiable"][-1]
    # one-lag estimate (no extrapolation) is biased more
    one_lag = diffusivity_from_band(
        steps, _band_from_cov(_ar1_cov(kappas, steps), WINDOW), n, WINDOW, fit_lags=1
    )
    assert abs(one_lag["diffusivity"][-1] - 1) > abs(res["diffusivity"][-1] - 1)
    # every direction relaxes within a spacing (kappa * spacing >= 3): flagged
    stiff = np.logspace(0, 2, n) * 3 / 100
    stiff = np.minimum(stiff, 1.0)
    res = diffusivity_from_band(steps, _band_from_cov(_ar1_cov(stiff, steps), WINDOW), n, WINDOW)
    assert not res["identifiable"][-1]
    assert res["diffusivity"][-1] < 0.6  # what the flag warns about


def test_white_noise_correction():
    """Known white measurement noise (e.g. rounding) is removed exactly in expectation."""
    steps = np.arange(3 * WINDOW) * 10
    n, q2 = 50, 2.0
    cov = np.minimum.outer(steps, steps).astype(float) + q2 * np.eye(steps.size)
    d2 = _band_from_cov(cov, WINDOW) * n
    raw = diffusivity_from_band(steps, d2, n, WINDOW)["diffusivity"][-1]
    fixed = diffusivity_from_band(steps, d2, n, WINDOW, white_noise_var=q2)["diffusivity"][-1]
    assert raw > 1.2
    assert abs(fixed - 1) < 1e-9


def test_insufficient_history_and_bad_arguments():
    steps = np.arange(5)
    d2 = np.full((5, 3), np.nan)
    res = diffusivity_from_band(steps, d2, 10, 3)
    assert np.all(np.isnan(res["diffusivity"])) and not res["identifiable"].any()
    with pytest.raises(ValueError):
        diffusivity_from_band(steps, d2, 10, 4)  # window > max_lag
    with pytest.raises(ValueError):
        diffusivity_from_band(steps[::-1], d2, 10, 2)


def test_temperature_from_diffusivity():
    d = np.array([2e-4, 2e-4, 2e-4, 2e-4])
    e = np.array([1e-5] * 4)
    lr = np.array([0.01, np.nan, 0.0, -1.0])
    t, te = temperature_from_diffusivity(d, e, lr)
    assert t[0] == pytest.approx(0.01) and te[0] == pytest.approx(5e-4)
    assert np.all(np.isnan(t[1:])) and np.all(np.isnan(te[1:]))
    t, _ = temperature_from_diffusivity(d, e, 0.02)
    np.testing.assert_allclose(t, 5e-3)


def test_window_learning_rate():
    steps = np.array([0, 10, 20, 30])
    log_steps = np.array([1, 16])
    log_lr = np.array([0.1, 0.4])  # 0.1 for updates 1..15, 0.4 from 16 on
    got = window_learning_rate(steps, log_steps, log_lr, 2)
    assert np.isnan(got[:2]).all()
    assert got[2] == pytest.approx((15 * 0.1 + 5 * 0.4) / 20)
    assert got[3] == pytest.approx((5 * 0.1 + 15 * 0.4) / 20)
    assert np.isnan(window_learning_rate(steps, [], [], 2)).all()


def test_rounding_noise_var():
    x = torch.linspace(1.0, 1.99, 1000).bfloat16()  # bf16 ulp on [1, 2) is 2^-7
    assert rounding_noise_var(x) == pytest.approx(2.0**-14 / 12)
    assert rounding_noise_var(x.double()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rounding_noise_var_is_exact_against_frexp(dtype):
    """The ulp comes from the exact binary exponent, also just below a power of two, where a
    float32 log2 rounds up to the next integer (the former path: up to 1.8e-4 off)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20000, generator=gen) * 0.02
    x[:64] = 2.0 ** torch.arange(-32, 32, dtype=torch.float32) * (1 - 2.0**-24)
    x[64:80], x[80], x[81] = 0.0, float("nan"), float("-inf")
    v = x.to(dtype)
    bits = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}[dtype]
    ref = v.double().numpy()
    ref = ref[np.isfinite(ref) & (ref != 0)]
    _, exponent = np.frexp(np.abs(ref))  # |x| = m 2^e with m in [0.5, 1): floor(log2) = e - 1
    expected = np.mean(np.ldexp(1.0, exponent - 1 - (bits - 1)) ** 2) / 12
    assert rounding_noise_var(v) == pytest.approx(expected, rel=1e-12)
