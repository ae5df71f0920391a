"""Cross-run quantities of a sweep (the ``sweep`` node): plateau summaries per run, the power
law T = b lr^k, the free-energy temperature and the heat capacity. Formulas: METHODS.md 5, 7.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from pipeline.estimators.thermodynamics import (
    fit_power_law,
    free_energy_temperature,
    heat_capacity,
    schedule_diagnostics,
)
from pipeline.store.zarr_io import annotate


def _second_half(values: np.ndarray) -> np.ndarray:
    half = values[len(values) // 2 :]
    return half[np.isfinite(half)]


def _second_half_windows(ds: xr.Dataset) -> np.ndarray:
    """Ensemble entropy (summed over layers) of the windows starting in the run's second half
    (the last window when none does): windows of one stationary plateau, averaged for S."""
    ens = ds.ensemble_entropy.sum("layer", skipna=False).values
    if ens.size == 0:
        return ens
    late = ds.window_start.values >= ds.step.values[len(ds.step) // 2]
    picked = ens[late] if late.any() else ens[-1:]
    return picked[np.isfinite(picked)]


def _plateau(ds: xr.Dataset) -> dict:
    """Per-run plateau summary: LR, temperature, U, S, final loss over the second half."""
    lr = _second_half(ds.window_learning_rate.values)
    temp = _second_half(ds.global_temperature.values)
    loss = _second_half(ds.loss.values)
    ens = _second_half_windows(ds)
    logged = ds.log_loss.values[np.isfinite(ds.log_loss.values)]
    return {
        "run_learning_rate": np.median(lr) if lr.size else np.nan,
        "constant_lr": int(lr.size > 0 and lr.max() <= 1.05 * lr.min()),
        "run_temperature": np.median(temp) if temp.size else np.nan,
        "internal_energy": loss.mean() if loss.size else np.nan,
        "run_ensemble_entropy": ens.mean() if ens.size else np.nan,
        "final_loss": logged[-1] if logged.size else np.nan,
    }


def _logged_lr(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(steps, lr) of the run's LR log without missing entries (NaN if nothing is logged)."""
    lr = ds.log_learning_rate.values.astype(np.float64)
    ok = np.isfinite(lr)
    if not ok.any():
        return np.array([0.0, 1.0]), np.array([np.nan, np.nan])
    return ds.log_step.values[ok].astype(np.float64), lr[ok]


def sweep_dataset(runs: dict[str, xr.Dataset]) -> xr.Dataset:
    """Cross-run fits: T vs LR power law, free-energy temperature, heat capacity, schedules."""
    names = sorted(runs)
    rows = [_plateau(runs[n]) for n in names]
    cols = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}
    plateau = cols["constant_lr"] > 0
    b, k, k_err = fit_power_law(
        cols["run_learning_rate"][plateau], cols["run_temperature"][plateau]
    )
    fe = [np.full(len(names), np.nan) for _ in range(3)]
    if plateau.sum() >= 2:
        est = free_energy_temperature(
            cols["internal_energy"][plateau], cols["run_ensemble_entropy"][plateau]
        )
        for target, value in zip(fe, est):
            target[plateau] = value
    t_mid, capacity = heat_capacity(
        cols["internal_energy"][plateau], cols["run_temperature"][plateau]
    )
    logs = [_logged_lr(runs[n]) for n in names]
    sched = schedule_diagnostics([lr for _, lr in logs], cols["final_loss"], [s for s, _ in logs])
    ds = xr.Dataset(
        {key: ("run", value) for key, value in cols.items()}
        | {
            "free_energy_temperature": ("run", fe[0]),
            "free_energy_temperature_lower": ("run", fe[1]),
            "free_energy_temperature_upper": ("run", fe[2]),
            "min_lr": ("run", sched["min_lr"]),
            "lr_sum": ("run", sched["lr_sum"]),
            "predicted_final_loss": ("run", sched["predicted"]),
            "heat_capacity": ("pair", capacity),
            "fit_b": ((), b),
            "fit_k": ((), k),
            "fit_k_err": ((), k_err),
        },
        coords={"run": names, "pair_temperature": ("pair", t_mid)},
    )
    ds["constant_lr"] = ds.constant_lr.astype(np.int8)
    return annotate(ds)
