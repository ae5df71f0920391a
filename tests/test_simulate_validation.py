"""METHODS.md validation of the local temperature on simulated safetensors series.

Bands are computed from the written files (``safetensors.torch.load_file`` + ``sq_distance_band``
in checkpoint order, ``max_lag`` previous tensors kept), then ``diffusivity_from_band`` and
``temperature_from_diffusivity`` with the window-mean LR from the written log.
"""

import csv

import numpy as np
import pytest
from safetensors.torch import load_file

from pipeline.estimators.displacement import (
    diffusivity_from_band,
    rounding_noise_var,
    temperature_from_diffusivity,
    window_learning_rate,
)
from pipeline.testing.simulate import (
    LayerSpec,
    reference_band,
    simulate_linear_regression_sgd,
    simulate_quadratic_series,
)

WINDOW = 8
LRS = (0.01, 0.03)  # two plateaus, ratio 3
SIGMAS = (0.01, 0.015, 0.022, 0.033)  # per-layer noise: T_l = lr sigma_l^2 / 2, all distinct
N_PARAMS = 16 * 32
TOL = 0.10


def _specs(spacing, drift=True, kappa_spacing=0.5, max_kappa_step=0.05):
    """Layers whose stiffest direction relaxes by kappa_spacing per checkpoint interval at the
    high LR (kappa = lr h), capped at max_kappa_step per step; curvature spans two decades; the
    flat direction's drift equals the noise displacement over a window."""
    h_max = min(kappa_spacing / (LRS[1] * spacing), max_kappa_step / LRS[1])
    return [
        LayerSpec(
            noise_std=s,
            curvature_min=h_max / 100,
            drift_gradient=s * np.sqrt(N_PARAMS / (WINDOW * spacing)) if drift else 0.0,
            weight_scale=0.1,
        )
        for s in SIGMAS
    ]


def _read_log(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    steps = np.array([int(r["step"]) for r in rows])
    lr = np.array([float(r["lr"]) if r["lr"] else np.nan for r in rows])
    return steps, lr


def _measure(truth, correct_rounding=False):
    """Per layer: dict of estimator outputs + temperature, from the files and log."""
    log_steps, log_lr = _read_log(truth.log_path)
    lr = window_learning_rate(truth.steps, log_steps, log_lr, WINDOW)
    out = []
    for name in truth.layer_names:
        d2, numel = reference_band(truth.files, name, WINDOW)
        q2 = 0.0
        if correct_rounding:
            q2 = float(np.mean([rounding_noise_var(load_file(str(f))[name]) for f in truth.files]))
        res = diffusivity_from_band(truth.steps, d2, numel, WINDOW, white_noise_var=q2)
        res["temperature"], res["temperature_err"] = temperature_from_diffusivity(
            res["diffusivity"], res["diffusivity_err"], lr
        )
        out.append(res)
    return out


def _plateau_mask(truth, p):
    """Windows lying entirely inside plateau p (all their updates at that LR)."""
    first, last, _ = truth.plateaus[p]
    spacing = np.diff(truth.steps).max()
    return (truth.steps - WINDOW * spacing >= first - 1) & (truth.steps <= last)


def _plateau_table(truth, measured, key="temperature"):
    """(n_layers, n_plateaus) mean of a measured series over each plateau's windows."""
    return np.array(
        [
            [np.nanmean(m[key][_plateau_mask(truth, p)]) for p in range(len(truth.plateaus))]
            for m in measured
        ]
    )


def _simulate(tmp_path, spacing, dtype="F32", drift=True, seed=0, per_plateau=40, **kw):
    return simulate_quadratic_series(
        tmp_path,
        _specs(spacing, drift=drift, **kw),
        [(per_plateau * spacing, LRS[0]), (per_plateau * spacing, LRS[1])],
        checkpoint_every=spacing,
        dtype=dtype,
        seed=seed,
    )


def _check_recovery(truth, measured, tol=TOL):
    temp = _plateau_table(truth, measured)
    rel = temp / truth.temperature - 1
    assert np.all(np.abs(rel) < tol), f"relative errors {rel}"
    for p in range(temp.shape[1]):  # exact layer ranking within each plateau
        assert list(np.argsort(temp[:, p])) == list(np.argsort(truth.temperature[:, p]))
    ratio = temp[:, 1] / temp[:, 0]
    assert np.all(np.abs(ratio / (LRS[1] / LRS[0]) - 1) < tol), f"plateau ratios {ratio}"
    ident = np.mean(
        [m["identifiable"][_plateau_mask(truth, p)].mean() for m in measured for p in range(2)]
    )
    assert ident > 0.9
    return rel


@pytest.mark.parametrize("spacing", [10])
def test_per_layer_temperature_fp32(tmp_path, spacing):
    truth = _simulate(tmp_path, spacing)
    _check_recovery(truth, _measure(truth))


@pytest.mark.slow
@pytest.mark.parametrize("spacing", [1, 100])
def test_per_layer_temperature_fp32_other_spacings(tmp_path, spacing):
    truth = _simulate(tmp_path, spacing)
    _check_recovery(truth, _measure(truth))


def test_bf16_series_with_rounding_correction(tmp_path):
    """bf16 files at spacing 100: rounding noise (ulp^2/12 per element, measured from the files)
    is subtracted; the fp32 tolerance holds."""
    truth = _simulate(tmp_path, 100, dtype="BF16")
    _check_recovery(truth, _measure(truth, correct_rounding=True))


@pytest.mark.slow
def test_bf16_spacing_10_needs_rounding_correction(tmp_path):
    truth = _simulate(tmp_path, 10, dtype="BF16")
    raw = _plateau_table(truth, _measure(truth)) / truth.temperature - 1
    assert raw.max() > TOL  # uncorrected rounding noise biases the coldest layer high
    _check_recovery(truth, _measure(truth, correct_rounding=True))


def test_drift_does_not_bias_temperature(tmp_path):
    """Same seed with and without a drifting flat direction: same T (detrending)."""
    with_drift = _simulate(tmp_path / "drift", 10, drift=True, per_plateau=25)
    no_drift = _simulate(tmp_path / "still", 10, drift=False, per_plateau=25)
    measured = _measure(with_drift)
    t_drift = _plateau_table(with_drift, measured)
    t_still = _plateau_table(no_drift, _measure(no_drift))
    assert np.all(np.abs(t_drift / t_still - 1) < 0.03)
    speed2 = _plateau_table(with_drift, measured, key="drift_speed2")
    assert np.all(speed2 > 0)


def test_coarse_spacing_is_flagged(tmp_path):
    """Every valley direction relaxes within one interval (lr h spacing >= 3): flagged."""
    spacing = 1000  # lr h per step from 0.003 to 0.3 (stable), lr h spacing from 3 to 300
    specs = [LayerSpec(noise_std=s, curvature_min=3 / (LRS[0] * spacing)) for s in SIGMAS[:2]]
    truth = simulate_quadratic_series(
        tmp_path, specs, [(25 * spacing, LRS[0])], checkpoint_every=spacing, seed=3
    )
    measured = _measure(truth)
    for m in measured:
        assert np.mean(m["identifiable"][WINDOW:]) < 0.1


@pytest.mark.slow
def test_uneven_spacing(tmp_path):
    rng = np.random.default_rng(5)
    steps = np.unique(np.concatenate([[0], np.cumsum(rng.integers(3, 30, size=90))]))
    steps = steps[steps <= 1600]
    truth = simulate_quadratic_series(
        tmp_path, _specs(30), [(800, LRS[0]), (800, LRS[1])], checkpoint_steps=steps, seed=4
    )
    _check_recovery(truth, _measure(truth))


def _toy_temperature(tmp_path, n_samples, lr, seed=0):
    truth = simulate_linear_regression_sgd(
        tmp_path,
        n_samples=n_samples,
        n_features=256,
        learning_rate=lr,
        n_steps=400,
        checkpoint_every=10,
        burn_in=int(400 / lr),
        seed=seed,
    )
    res = _measure(truth)[0]
    return np.nanmean(res["temperature"])


def test_overparameterized_temperature_falls_to_zero(tmp_path):
    """Sadrtdinov et al. 2025: interpolating model -> T ~ 0 at low LR; under-parameterized
    T > 0, growing."""
    lrs = (0.05, 0.2)
    under = [_toy_temperature(tmp_path / f"u{lr}", 1024, lr) for lr in lrs]
    over_low = _toy_temperature(tmp_path / "o", 64, lrs[0])
    assert under[0] > 0 and under[1] > 2 * under[0]
    assert over_low < 0.05 * under[0]
