"""Local and global temperature from the measured squared-distance band (stage thermo).

``add_temperature`` turns each layer's MSD-vs-lag band into a diffusivity and, with the
window's logged learning rate, a temperature in loss units; ``add_global_temperature`` forms
the n-weighted mean over layers and its spread. Formulas: METHODS.md, section 3.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from pipeline.core.reasons import TemperatureReason
from pipeline.estimators.displacement import (
    checkpoint_windows,
    diffusivity_from_band,
    temperature_from_diffusivity,
    window_learning_rate,
)
from pipeline.thermo.relation import temperature_relation


def per_layer(ds: xr.Dataset, fn) -> dict[str, np.ndarray]:
    """Apply ``fn(layer_index) -> dict of arrays over step`` to every layer; stack on layer."""
    parts = [fn(j) for j in range(ds.sizes["layer"])]
    return {k: np.stack([p[k] for p in parts], axis=1) for k in parts[0]}


MIN_ROUNDING_RESOLUTION = (
    0.25  # rms move between checkpoints >= ulp / 2 (window_rounding_resolution)
)


def window_rounding_resolution(
    msd: np.ndarray, noise_var: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> np.ndarray:
    """(window mean of MSD per interval - 2 q2) / (12 q2): squared move over the mean ulp^2.

    ``msd`` (step, layer) weight^2/param between consecutive checkpoints, ``noise_var`` q2 per
    layer = ulp^2 / 12 of the storage dtype (``rounding_noise_var``), ``starts``/``ends`` each
    step's window (``checkpoint_windows``; the window's intervals are the MSDs at
    start+1..end). The rounding correction of ``diffusivity_from_band`` assumes independent
    rounding errors at each checkpoint, which fails when coordinates move by less than about
    half an ulp between checkpoints (they stick to the same stored value); below
    MIN_ROUNDING_RESOLUTION the temperature is refused (calibrated on bf16 Langevin series:
    errors > 10% only below ~0.15). Dimensionless; inf for fp64 (q2 = 0), NaN without window.
    """
    msd = np.asarray(msd, dtype=np.float64)
    out = np.full(msd.shape, np.nan)
    for t, (start, end) in enumerate(zip(starts, ends)):
        if start >= 0:
            out[t] = msd[start + 1 : end + 1].mean(axis=0)
    q2 = np.asarray(noise_var, dtype=np.float64)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(
            q2 > 0, (out - 2 * q2) / (12 * q2), np.where(np.isfinite(out), np.inf, np.nan)
        )


ROUNDING_CORRECTIONS = ("auto", "storage", "none")


def rounding_correction(ds: xr.Dataset, setting: str = "auto"):
    """Per layer: the white rounding noise to subtract (weight^2), the noise whose grid limits
    the resolution test, and a label saying which correction was used.

    ``auto``: fp32/fp16 files whose values all lie on the bf16 grid (``on_bf16_grid`` at every
    step) hold pure-bf16 training exported losslessly: nothing is subtracted, the resolution is
    judged on the bf16 grid the training moved on. bf16 files: the export rounding of fp32
    master weights is subtracted (mixed precision; a pure-bf16 run saved in bf16 has no export
    rounding: set ``thermo.rounding_correction: none``). Other files: the storage dtype's
    rounding (ulp^2/12; ~1e-15 relative for fp32). ``storage``: always the storage rounding;
    ``none``: nothing subtracted. METHODS.md, "bf16".
    """
    if setting not in ROUNDING_CORRECTIONS:
        raise ValueError(
            f"thermo.rounding_correction {setting!r} not one of {ROUNDING_CORRECTIONS}"
        )
    storage = ds.rounding_noise_var.mean("step").values
    grid = ds.bf16_noise_var.mean("step").values if "bf16_noise_var" in ds else storage
    dtypes = (
        [str(d) for d in ds.storage_dtype.values] if "storage_dtype" in ds else ["?"] * len(storage)
    )
    on_grid = (
        (ds.on_bf16_grid.fillna(0).min("step").values > 0)
        if "on_bf16_grid" in ds
        else np.zeros(len(storage), dtype=bool)
    )
    subtract, resolution, labels = storage.copy(), storage.copy(), []
    for j, dtype in enumerate(dtypes):
        pure = on_grid[j] and dtype != "BF16"
        if pure:
            resolution[j] = grid[j]
        if setting == "none" or (setting == "auto" and pure):
            subtract[j] = 0.0
            why = (
                "pure-bf16 training exported to " + dtype
                if pure and setting == "auto"
                else "setting"
            )
            labels.append(f"none ({why})")
        elif dtype == "BF16":
            labels.append("bf16 export rounding subtracted (assumes fp32 master weights)")
        else:
            labels.append(f"{dtype} storage rounding subtracted")
    return subtract, resolution, labels


def add_temperature(
    ds: xr.Dataset,
    window: int,
    optimizer: str = "auto",
    max_grad_norm: float | None = 1.0,
    min_window: int | None = None,
    rounding: str = "auto",
) -> xr.Dataset:
    """Diffusivity and local temperature per (step, layer) from the squared-distance band;
    the optimizer decides which band and which step size form the temperature
    (``relation.temperature_relation``).

    Windows: centred, ``window`` intervals wide, shrinking to ``min_window`` at the ends of the
    series (``checkpoint_windows``; None: trailing). Refuse, don't flag: a cell whose
    conditions fail gets NaN temperature (and NaN diffusivity unless only the step size is
    missing or the optimizer relation refused) and its ``temperature_reason`` code
    (``pipeline.core.reasons.TEMPERATURE_REASONS``).
    """
    window = max(1, min(int(window), ds.sizes["lag"]))
    if min_window is not None:
        min_window = max(1, min(int(min_window), window))
    steps = ds.step.values
    n_params = ds.n_params.values
    # weight^2: the white rounding noise subtracted, and the grid the resolution test uses
    noise, grid_noise, correction = rounding_correction(ds, rounding)

    def estimate(band, white, offset=0.0):
        return per_layer(
            ds,
            lambda j: diffusivity_from_band(
                steps,
                band[:, j, :],
                int(n_params[j]),
                window,
                white_noise_var=float(white[j]),
                offset_steps=offset,
                min_window=min_window,
            ),
        )

    est = estimate(ds.sq_distance.values, noise)
    starts, ends = checkpoint_windows(steps.size, window, min_window)
    lr = window_learning_rate(
        steps, ds.log_step.values, ds.log_learning_rate.values, window, min_window
    )
    subtracted = ds.rounding_noise_var.copy(data=np.broadcast_to(noise, ds.msd.shape).copy())
    rel = temperature_relation(ds.assign(rounding_noise_var=subtracted), optimizer, max_grad_norm)
    used = est
    if rel.estimator == "preconditioned_adam" or rel.offset_steps:
        used = estimate(rel.band, rel.noise, rel.offset_steps)
    eta = _window_eta(rel, steps, lr, window, min_window, ds.sizes["layer"])
    resolution = window_rounding_resolution(ds.msd.values, grid_noise, starts, ends)
    d_reason = _with_rounding(est["reason"], resolution)
    reason = _with_rounding(used["reason"], resolution)
    if rel.refusal or rel.band is None:  # precedence: TEMPERATURE_REASONS' docstring
        reason[reason != TemperatureReason.TOO_FEW_CHECKPOINTS] = (
            TemperatureReason.OPTIMIZER_STATE_MISSING
        )
    reason[(reason == TemperatureReason.IDENTIFIED) & ~(np.isfinite(eta) & (eta > 0))] = (
        TemperatureReason.NO_LR_LOG
    )
    ok = reason == TemperatureReason.IDENTIFIED
    temp, temp_err = temperature_from_diffusivity(
        np.where(ok, used["diffusivity"], np.nan),
        np.where(ok, used["diffusivity_err"], np.nan),
        eta,
    )
    d_ok = d_reason == TemperatureReason.IDENTIFIED
    diffusivity = np.where(d_ok, est["diffusivity"], np.nan)
    dims = ("step", "layer")
    with np.errstate(divide="ignore", invalid="ignore"):
        per_lr2 = diffusivity / eta**2
    ds = ds.assign(
        diffusivity_precond=(
            dims,
            np.where(ok, used["diffusivity"], np.nan)
            if rel.estimator == "preconditioned_adam"
            else np.nan * temp,
        ),
        diffusivity_per_lr2=(dims, per_lr2),
        effective_learning_rate=(dims, eta),
        temperature_estimator=((), rel.estimator),
        temperature_refusal=((), rel.refusal),
        momentum_offset_steps=((), rel.offset_steps),
        clip_fraction=((), rel.clip_fraction),
    )
    ds.attrs.update(optimizer=rel.optimizer, optimizer_source=rel.source)
    return ds.assign(
        diffusivity=(dims, diffusivity),
        diffusivity_err=(dims, np.where(d_ok, est["diffusivity_err"], np.nan)),
        temperature_reason=(dims, reason),
        rounding_resolution=(dims, resolution),
        drift_speed2=(dims, est["drift_speed2"]),
        window_learning_rate=("step", lr),
        temperature=(dims, temp),
        temperature_err=(dims, temp_err),
    ).assign_coords(
        temperature_window_start=("step", _steps_at(steps, starts)),
        temperature_window_end=("step", _steps_at(steps, ends)),
        rounding_correction=("layer", correction),
    )


def _with_rounding(reason: np.ndarray, resolution: np.ndarray) -> np.ndarray:
    """Reason codes with ROUNDING_LIMITED where an otherwise identified window is unresolved."""
    out = reason.astype(np.int8).copy()
    limited = (out == TemperatureReason.IDENTIFIED) & ~(resolution >= MIN_ROUNDING_RESOLUTION)
    out[limited] = TemperatureReason.ROUNDING_LIMITED
    return out


def _window_eta(rel, steps, log_lr, window: int, min_window: int | None, n_layers: int):
    """(step, layer) mean step size over each window: from the optimizer state (the value
    saved at checkpoint c is the step size of the updates after c: the scheduler has stepped)
    or, without state, the logged learning rate (``window_learning_rate``)."""
    if rel.eta is None:
        return np.repeat(log_lr[:, None], n_layers, axis=1)
    return np.stack(
        [
            window_learning_rate(steps, steps + 1, rel.eta[:, j], window, min_window)
            for j in range(n_layers)
        ],
        axis=1,
    )


def _steps_at(steps: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Steps at checkpoint indices, -1 where the index is -1 (no window)."""
    return np.where(index >= 0, np.asarray(steps)[np.clip(index, 0, None)], -1).astype(np.int64)


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean over the last axis with weights, ignoring NaN (NaN where nothing is finite)."""
    ok = np.isfinite(values)
    w = np.where(ok, weights, 0.0)
    total = w.sum(axis=-1)
    weighted = (np.where(ok, values, 0.0) * w).sum(axis=-1)
    return np.where(total > 0, weighted / np.where(total > 0, total, 1.0), np.nan)


MIN_GLOBAL_COVERAGE = 0.5
"""Global T needs identified layers holding at least this fraction of the parameters."""


def add_global_temperature(ds: xr.Dataset) -> xr.Dataset:
    """Global T (n-weighted mean over identified layers) and its spread across them.

    Masked layers (NaN temperature) do not enter. ``global_temperature_coverage`` is the
    fraction of the run's parameters whose layers have an identified T at that step; below
    MIN_GLOBAL_COVERAGE the global T is refused (NaN): a mean over a minority of the
    parameters is not the run's temperature. The spread (relative n-weighted standard
    deviation, the equipartition test) needs at least 2 identified layers.
    """
    temp = ds.temperature.values
    n = ds.n_params.values.astype(np.float64)
    ok = np.isfinite(temp)
    coverage = (ok * n[None, :]).sum(axis=1) / n.sum() if n.sum() > 0 else np.zeros(len(temp))
    mean = np.where(coverage >= MIN_GLOBAL_COVERAGE, _weighted_mean(temp, n), np.nan)
    var = _weighted_mean((temp - mean[:, None]) ** 2, n)
    spread = np.where(
        (mean > 0) & (ok.sum(axis=1) >= 2), np.sqrt(var) / np.where(mean > 0, mean, 1), np.nan
    )
    return ds.assign(
        global_temperature=("step", mean),
        global_temperature_coverage=("step", coverage),
        temperature_spread=("step", spread),
    )
