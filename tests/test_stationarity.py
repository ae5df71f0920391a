"""Stationarity gates of the sweep fits (free-energy T, T = b lr^k, heat capacity).

Runs are simulated Langevin series (real safetensors files) turned into run datasets by the
thermo functions; the sweep must accept stationary plateaus with known answers (k = 1, k = 1.5,
C = number of valley directions / 2) and refuse non-stationary ones with their reason.
"""

import numpy as np
import xarray as xr

from pipeline.core.reasons import FitReason as F
from pipeline.testing.simulate import LayerSpec, reference_band, simulate_quadratic_series
from pipeline.thermo.run import add_ensemble_entropy
from pipeline.thermo.sweep import K_TOLERANCE, relative_trend, sweep_dataset
from pipeline.thermo.temperature import add_global_temperature, add_temperature

LRS = (0.01, 0.03, 0.1)
SPACING, N_CKPT, SHAPE = 10, 41, (16, 32)
H_MAX = 0.3 / (max(LRS) * SPACING)  # stiffest direction relaxes by <= 0.3 per interval


def _run(tmp_path, lr, seed, noise_std=0.02, drift=0.0, n_layers=2) -> xr.Dataset:
    """One simulated constant-LR run as the derived variables the sweep reads."""
    specs = [
        LayerSpec(noise_std=noise_std, shape=SHAPE, curvature_min=H_MAX / 100, drift_gradient=drift)
        for _ in range(n_layers)
    ]
    truth = simulate_quadratic_series(
        tmp_path / f"lr_{lr}_{seed}",
        specs,
        [((N_CKPT - 1) * SPACING, lr)],
        checkpoint_every=SPACING,
        seed=seed,
    )
    bands = [reference_band(truth.files, name, 8) for name in truth.layer_names]
    d2 = np.stack([b for b, _ in bands], axis=1)
    n = np.array([k for _, k in bands])
    steps = truth.steps
    windows = np.arange(0, N_CKPT - 8, 8)
    ds = xr.Dataset(
        {
            "sq_distance": (("step", "layer", "lag"), d2),
            "msd": (("step", "layer"), d2[:, :, 0] / n[None, :]),
            "rounding_noise_var": (("step", "layer"), np.zeros((steps.size, n_layers))),
            "log_learning_rate": ("log_step", np.where(steps > 0, lr, np.nan)),
            "log_loss": ("log_step", truth.loss),
            "loss": ("step", truth.loss),
            # S is not under test here: a constant per window keeps the free-energy test finite
            "ensemble_log_var": (("window", "layer"), np.full((windows.size, n_layers), -1e3)),
            "ensemble_frozen": (("window", "layer"), np.zeros((windows.size, n_layers))),
        },
        coords={
            "step": steps,
            "layer": truth.layer_names,
            "lag": np.arange(1, 9),
            "log_step": steps,
            "n_params": ("layer", n),
            "window_start": ("window", steps[windows]),
        },
    )
    ds = add_global_temperature(add_temperature(ds, 8, min_window=4))
    return add_ensemble_entropy(ds), truth


def test_relative_trend_known_answer():
    steps = np.arange(11.0)
    assert abs(relative_trend(1.0 + 0.01 * steps, steps) - 0.1 / 1.05) < 1e-12
    assert relative_trend(np.ones(11), steps) < 1e-12
    assert np.isnan(relative_trend(np.array([1.0, np.nan]), np.arange(2)))


def test_stationary_plateaus_give_k_and_heat_capacity(tmp_path):
    """T = lr sigma^2 / 2: k = 1 within K_TOLERANCE; C = dU/dT = valley directions / 2."""
    runs, truths = {}, {}
    for i, lr in enumerate(LRS):
        runs[f"lr_{lr}"], truths[lr] = _run(tmp_path, lr, seed=i)
    sweep = sweep_dataset(runs)
    print(
        f"\n[stationary] plateau reasons {sweep.plateau_reason.values} loss trend "
        f"{np.round(sweep.loss_trend.values, 3)} T trend "
        f"{np.round(sweep.temperature_trend.values, 3)} k {float(sweep.fit_k):.4f} "
        f"+- {float(sweep.fit_k_err):.4f} C {sweep.heat_capacity.values}"
    )
    assert (sweep.plateau_reason == F.OK).all()
    assert int(sweep.fit_k_reason) == F.OK and abs(float(sweep.fit_k) - 1) < K_TOLERANCE
    assert int(sweep.lr_proportional) == 1
    valley = 2 * (np.prod(SHAPE) - 1)  # every direction but the flat one, over 2 layers
    assert (sweep.heat_capacity_reason == F.OK).all()
    np.testing.assert_allclose(sweep.heat_capacity.values, valley / 2, rtol=0.15)


def test_power_law_with_known_k(tmp_path):
    """sigma ~ lr^0.25 makes T = lr sigma^2 / 2 ~ lr^1.5: k recovered, proportionality rejected."""
    runs = {
        f"lr_{lr}": _run(tmp_path, lr, seed=10 + i, noise_std=0.02 * (lr / 0.01) ** 0.25)[0]
        for i, lr in enumerate(LRS)
    }
    sweep = sweep_dataset(runs)
    print(f"\n[k = 1.5] fit_k {float(sweep.fit_k):.4f} +- {float(sweep.fit_k_err):.4f}")
    assert abs(float(sweep.fit_k) - 1.5) < K_TOLERANCE
    assert int(sweep.lr_proportional) == 0


def test_non_stationary_runs_are_refused(tmp_path):
    """A drifting flat direction makes the loss fall over the whole run: every sweep fit is
    refused (NaN) with its reason, and nothing negative is stored."""
    runs = {f"lr_{lr}": _run(tmp_path, lr, seed=20 + i, drift=0.5)[0] for i, lr in enumerate(LRS)}
    sweep = sweep_dataset(runs)
    print(f"\n[drifting] loss trend {np.round(sweep.loss_trend.values, 3)}")
    assert (sweep.plateau_reason == F.NOT_STATIONARY).all()
    assert np.isnan(sweep.free_energy_temperature).all()
    assert (sweep.free_energy_temperature_reason == F.NOT_STATIONARY).all()
    assert (
        np.isnan(sweep.heat_capacity).all()
        and (sweep.heat_capacity_reason == F.TOO_FEW_PLATEAUS).all()
    )
    assert np.isnan(float(sweep.fit_k)) and int(sweep.fit_k_reason) == F.TOO_FEW_PLATEAUS
    assert (
        "reasons" in sweep.fit_k_reason.attrs
        and "stationary" in sweep.fit_k_reason.attrs["reasons"]
    )
