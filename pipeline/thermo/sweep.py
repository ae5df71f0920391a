"""Cross-run quantities of a sweep (the ``sweep`` node): plateau summaries per run, the power
law T = b lr^k, the free-energy temperature and the heat capacity. Formulas: METHODS.md 5, 7.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from pipeline.core.reasons import FitReason
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


K_TOLERANCE = 0.05
"""|k - 1| the power-law fit achieves on simulated constant-LR Langevin runs with T = lr sigma^2/2
(4 LRs over 30x, 3 layers of 512 parameters, 20 second-half checkpoints: std 0.004, worst
0.0085 over 12 seeds; the validated per-layer T errors, <= 5.1%, bound |dk| by 0.03 over the
same LR range). METHODS.md 5b."""


def relative_trend(values: np.ndarray, steps: np.ndarray) -> float:
    """|least-squares slope x span| / |mean| of the finite values (NaN with < 3 of them)."""
    ok = np.isfinite(values)
    y, x = values[ok], steps[ok].astype(np.float64)
    if y.size < 3 or np.ptp(x) == 0 or y.mean() == 0:
        return np.nan
    slope = np.polyfit(x, y, 1)[0]
    return float(abs(slope * np.ptp(x)) / abs(y.mean()))


def _step_size(ds: xr.Dataset) -> np.ndarray:
    """The run's step size per checkpoint: the temperature relation's eta (Adam: the state's
    lr; heavy ball: lr / (1 - mu)) where formed, else the logged window LR."""
    if "effective_learning_rate" not in ds:
        return ds.window_learning_rate.values
    eta = ds.effective_learning_rate.values
    finite = np.isfinite(eta)
    mean = np.where(finite, eta, 0.0).sum(axis=1) / np.maximum(finite.sum(axis=1), 1)
    return np.where(finite.any(axis=1), mean, ds.window_learning_rate.values)


def optimizer_group(ds: xr.Dataset) -> str:
    """The sweep group of a run: runs are compared only within one optimizer."""
    return str(ds.attrs.get("optimizer", "unknown"))


def _main_group(groups: list[str], ok: np.ndarray) -> str:
    """The optimizer group with the most accepted plateaus (ties: the most runs, then the
    first by name)."""
    names = sorted(set(groups))
    member = {g: np.array([x == g for x in groups]) for g in names}
    return max(
        names, key=lambda g: (int(ok[member[g]].sum()), int(member[g].sum()), -names.index(g))
    )


def _plateau(ds: xr.Dataset, rel_tol: float) -> dict:
    """Per-run plateau summary over the second half: LR, temperature, U, S, final loss, and
    the stationarity test: constant LR (within 5%), loss and (where identified) global T
    without a relative trend beyond rel_tol (NOT_STATIONARY otherwise); then an identified
    global T at >= half of those checkpoints (NO_TEMPERATURE otherwise: the plateau still
    serves the free-energy temperature, which needs only U and S)."""
    half = slice(ds.sizes["step"] // 2, None)
    lr = _second_half(_step_size(ds))
    temp = _second_half(ds.global_temperature.values)
    loss = _second_half(ds.loss.values)
    ens = _second_half_windows(ds)
    logged = ds.log_loss.values[np.isfinite(ds.log_loss.values)]
    steps = ds.step.values[half]
    loss_trend = relative_trend(ds.loss.values[half], steps)
    temp_trend = relative_trend(ds.global_temperature.values[half], steps)
    constant = bool(lr.size > 0 and lr.max() <= 1.05 * lr.min())
    if not (constant and loss_trend < rel_tol and not temp_trend >= rel_tol):
        reason = FitReason.NOT_STATIONARY
    elif temp.size < 0.5 * steps.size:
        reason = FitReason.NO_TEMPERATURE  # stationary, but no T: usable where T is not needed
    else:
        reason = FitReason.OK
    return {
        "run_learning_rate": np.median(lr) if lr.size else np.nan,
        "constant_lr": int(constant),
        "run_temperature": np.median(temp) if temp.size else np.nan,
        "internal_energy": loss.mean() if loss.size else np.nan,
        "run_ensemble_entropy": ens.mean() if ens.size else np.nan,
        "final_loss": logged[-1] if logged.size else np.nan,
        "loss_trend": loss_trend,
        "temperature_trend": temp_trend,
        "plateau_reason": int(reason),
    }


def _free_energy(cols: dict, ok: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Free-energy T (estimate, lower, upper) over the stationary plateaus, with reasons:
    runs off the plateau set keep their plateau reason, a non-positive or inconsistent
    estimate is refused (NOT_POSITIVE)."""
    n = ok.size
    fe = [np.full(n, np.nan) for _ in range(3)]
    reason = np.where(ok, FitReason.OK, cols["plateau_reason"]).astype(np.int8)
    if ok.sum() < 2:
        reason[ok] = FitReason.TOO_FEW_PLATEAUS
        return fe, reason
    est = free_energy_temperature(cols["internal_energy"][ok], cols["run_ensemble_entropy"][ok])
    for target, value in zip(fe, est):
        target[ok] = value
    bad = ok & ~(fe[0] > 0)
    reason[bad] = FitReason.NOT_POSITIVE
    fe[0] = np.where(bad, np.nan, fe[0])
    return fe, reason


def _heat_capacity(cols: dict, ok: np.ndarray):
    """C = dU/dT between stationary plateaus adjacent in T; C <= 0 refused (NOT_POSITIVE)."""
    if ok.sum() < 2:
        return np.array([np.nan]), np.array([np.nan]), np.array([FitReason.TOO_FEW_PLATEAUS])
    t_mid, capacity = heat_capacity(cols["internal_energy"][ok], cols["run_temperature"][ok])
    good = capacity > 0
    reason = np.where(good, FitReason.OK, FitReason.NOT_POSITIVE)
    return t_mid, np.where(good, capacity, np.nan), reason


def _power_law(cols: dict, ok: np.ndarray) -> dict:
    """T = b lr^k over the stationary plateaus (refused with fewer than 2) and the verdict on
    proportionality: 1 when |k - 1| <= K_TOLERANCE, 0 when |k - 1| > K_TOLERANCE + 2 k_err,
    -1 (undecided) otherwise or without k_err."""
    if ok.sum() < 2:
        return {
            "fit_b": np.nan,
            "fit_k": np.nan,
            "fit_k_err": np.nan,
            "lr_proportional": -1,
            "fit_k_reason": int(FitReason.TOO_FEW_PLATEAUS),
        }
    b, k, k_err = fit_power_law(cols["run_learning_rate"][ok], cols["run_temperature"][ok])
    off = abs(k - 1)
    verdict = 1 if off <= K_TOLERANCE else 0 if off > K_TOLERANCE + 2 * k_err else -1
    return {
        "fit_b": b,
        "fit_k": k,
        "fit_k_err": k_err,
        "lr_proportional": verdict,
        "fit_k_reason": int(FitReason.OK if np.isfinite(k) else FitReason.NO_TEMPERATURE),
    }


def _logged_lr(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(steps, lr) of the run's LR log without missing entries (NaN if nothing is logged)."""
    lr = ds.log_learning_rate.values.astype(np.float64)
    ok = np.isfinite(lr)
    if not ok.any():
        return np.array([0.0, 1.0]), np.array([np.nan, np.nan])
    return ds.log_step.values[ok].astype(np.float64), lr[ok]


def sweep_dataset(runs: dict[str, xr.Dataset], rel_tol: float = 0.05) -> xr.Dataset:
    """Cross-run fits over the stationary plateaus (``_plateau``; rel_tol: the stationarity
    tolerance): T vs LR power law, free-energy temperature, heat capacity; schedules over all
    runs. Refused values are NaN with their reason codes (``FIT_REASONS``).

    Runs are grouped by optimizer (``optimizer_group``): the power law is fitted within each
    group (``group_fit_*``); ``fit_*``, the free-energy temperature and the heat capacity use
    one group (``fit_group``: the most accepted plateaus), other runs get OTHER_OPTIMIZER. A
    fit across optimizers would compare temperatures made by different relations."""
    names = sorted(runs)
    rows = [_plateau(runs[n], rel_tol) for n in names]
    cols = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}
    groups = [optimizer_group(runs[n]) for n in names]
    estimators = [
        str(runs[n].temperature_estimator.values) if "temperature_estimator" in runs[n] else "none"
        for n in names
    ]
    ok = cols["plateau_reason"] == FitReason.OK
    group_names = sorted(set(groups))
    group_fits = [_power_law(cols, ok & (np.array(groups) == g)) for g in group_names]
    main = _main_group(groups, ok)
    in_main = np.array(groups) == main
    cols["plateau_reason"] = np.where(in_main, cols["plateau_reason"], FitReason.OTHER_OPTIMIZER)
    ok = cols["plateau_reason"] == FitReason.OK
    stationary = ok | (cols["plateau_reason"] == FitReason.NO_TEMPERATURE)
    fe, fe_reason = _free_energy(cols, stationary)
    t_mid, capacity, c_reason = _heat_capacity(cols, ok)
    fit = _power_law(cols, ok)
    logs = [_logged_lr(runs[n]) for n in names]
    sched = schedule_diagnostics([lr for _, lr in logs], cols["final_loss"], [s for s, _ in logs])
    ds = xr.Dataset(
        {key: ("run", value) for key, value in cols.items()}
        | {
            "free_energy_temperature": ("run", fe[0]),
            "free_energy_temperature_lower": ("run", fe[1]),
            "free_energy_temperature_upper": ("run", fe[2]),
            "free_energy_temperature_reason": ("run", fe_reason.astype(np.int8)),
            "min_lr": ("run", sched["min_lr"]),
            "lr_sum": ("run", sched["lr_sum"]),
            "predicted_final_loss": ("run", sched["predicted"]),
            "heat_capacity": ("pair", capacity),
            "heat_capacity_reason": ("pair", np.asarray(c_reason, dtype=np.int8)),
            "fit_b": ((), fit["fit_b"]),
            "fit_k": ((), fit["fit_k"]),
            "fit_k_err": ((), fit["fit_k_err"]),
            "fit_k_reason": ((), np.int8(fit["fit_k_reason"])),
            "lr_proportional": ((), np.int8(fit["lr_proportional"])),
            "fit_group": ((), main),
            "group_fit_b": ("optimizer_group", np.array([f["fit_b"] for f in group_fits])),
            "group_fit_k": ("optimizer_group", np.array([f["fit_k"] for f in group_fits])),
            "group_fit_k_err": (
                "optimizer_group",
                np.array([f["fit_k_err"] for f in group_fits]),
            ),
            "group_fit_k_reason": (
                "optimizer_group",
                np.array([f["fit_k_reason"] for f in group_fits], dtype=np.int8),
            ),
        },
        coords={
            "run": names,
            "pair_temperature": ("pair", t_mid),
            "optimizer_group": group_names,
            "run_optimizer": ("run", np.array(groups, dtype=str)),
            "run_estimator": ("run", np.array(estimators, dtype=str)),
        },
    )
    ds["constant_lr"] = ds.constant_lr.astype(np.int8)
    ds["plateau_reason"] = ds.plateau_reason.astype(np.int8)
    ds["lr_proportional"].attrs["tolerance"] = K_TOLERANCE
    return annotate(ds)
