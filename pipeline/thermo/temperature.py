"""Local and global temperature from the measured squared-distance band (stage thermo).

``add_temperature`` turns each layer's MSD-vs-lag band into a diffusivity and, with the
window's logged learning rate, a temperature in loss units; ``add_global_temperature`` forms
the n-weighted mean over layers and its spread. Formulas: METHODS.md, section 3.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.estimators.displacement import (
    diffusivity_from_band,
    temperature_from_diffusivity,
    window_learning_rate,
)
from pipeline.thermo.relation import temperature_relation


def per_layer(ds: xr.Dataset, fn) -> dict[str, np.ndarray]:
    """Apply ``fn(layer_index) -> dict of arrays over step`` to every layer; stack on layer."""
    parts = [fn(j) for j in range(ds.sizes["layer"])]
    return {k: np.stack([p[k] for p in parts], axis=1) for k in parts[0]}


MIN_ROUNDING_RESOLUTION = 0.25  # rms move between checkpoints >= ulp / 2 (see rounding_resolution)


def rounding_resolution(msd: np.ndarray, noise_var: np.ndarray, window: int) -> np.ndarray:
    """(window mean of MSD per interval - 2 q2) / (12 q2): squared move over the mean ulp^2.

    ``msd`` (step, layer) weight^2/param between consecutive checkpoints, ``noise_var`` q2 per
    layer = ulp^2 / 12 of the storage dtype (``rounding_noise_var``). The rounding correction
    of ``diffusivity_from_band`` assumes independent rounding errors at each checkpoint, which
    fails when coordinates move by less than about half an ulp between checkpoints (they stick
    to the same stored value); below MIN_ROUNDING_RESOLUTION the temperature is flagged
    unidentifiable (calibrated on bf16 Langevin series: errors > 10% only below ~0.15).
    Dimensionless; inf for fp64 (q2 = 0), NaN before the window has history.
    """
    out = np.full(msd.shape, np.nan)
    if msd.shape[0] >= window:
        out[window - 1 :] = sliding_window_view(msd, window, axis=0).mean(axis=-1)
    q2 = np.asarray(noise_var, dtype=np.float64)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(
            q2 > 0, (out - 2 * q2) / (12 * q2), np.where(np.isfinite(out), np.inf, np.nan)
        )


def add_temperature(
    ds: xr.Dataset, window: int, optimizer: str = "auto", max_grad_norm: float | None = 1.0
) -> xr.Dataset:
    """Diffusivity and local temperature per (step, layer) from the squared-distance band;
    the optimizer decides which band and which step size form the temperature
    (``relation.temperature_relation``)."""
    window = max(1, min(int(window), ds.sizes["lag"]))
    steps = ds.step.values
    band = ds.sq_distance.values
    n_params = ds.n_params.values
    noise = ds.rounding_noise_var.mean("step").values  # weight^2, white noise of the storage dtype
    est = per_layer(
        ds,
        lambda j: diffusivity_from_band(
            steps, band[:, j, :], int(n_params[j]), window, white_noise_var=float(noise[j])
        ),
    )
    lr = window_learning_rate(steps, ds.log_step.values, ds.log_learning_rate.values, window)
    rel = temperature_relation(ds, optimizer, max_grad_norm)
    used = est
    if rel.estimator == "preconditioned_adam" or rel.offset_steps:
        used = per_layer(
            ds,
            lambda j: diffusivity_from_band(
                steps,
                rel.band[:, j, :],
                int(n_params[j]),
                window,
                white_noise_var=float(rel.noise[j]),
                offset_steps=rel.offset_steps,
            ),
        )
    eta = _window_eta(rel, steps, lr, window, ds.sizes["layer"])
    temp, temp_err = temperature_from_diffusivity(used["diffusivity"], used["diffusivity_err"], eta)
    if rel.refusal or rel.band is None:
        temp, temp_err = np.full_like(temp, np.nan), np.full_like(temp, np.nan)
    resolution = rounding_resolution(ds.msd.values, noise, window)
    ident = used["identifiable"] & (resolution >= MIN_ROUNDING_RESOLUTION)
    dims = ("step", "layer")
    with np.errstate(divide="ignore", invalid="ignore"):
        per_lr2 = est["diffusivity"] / eta**2
    ds = ds.assign(
        diffusivity_precond=(
            dims,
            used["diffusivity"] if rel.estimator == "preconditioned_adam" else np.nan * temp,
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
        diffusivity=(dims, est["diffusivity"]),
        diffusivity_err=(dims, est["diffusivity_err"]),
        temperature_identifiable=(dims, ident.astype(np.int8)),
        rounding_resolution=(dims, resolution),
        drift_speed2=(dims, est["drift_speed2"]),
        window_learning_rate=("step", lr),
        temperature=(dims, temp),
        temperature_err=(dims, temp_err),
    )


def _window_eta(rel, steps: np.ndarray, log_lr: np.ndarray, window: int, n_layers: int):
    """(step, layer) mean step size over each trailing window: from the optimizer state (the
    value saved at checkpoint c is the step size of the updates after c: the scheduler has
    stepped) or, without state, the logged learning rate (``window_learning_rate``)."""
    if rel.eta is None:
        return np.repeat(log_lr[:, None], n_layers, axis=1)
    return np.stack(
        [window_learning_rate(steps, steps + 1, rel.eta[:, j], window) for j in range(n_layers)],
        axis=1,
    )


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean over the last axis with weights, ignoring NaN (NaN where nothing is finite)."""
    ok = np.isfinite(values)
    w = np.where(ok, weights, 0.0)
    total = w.sum(axis=-1)
    weighted = (np.where(ok, values, 0.0) * w).sum(axis=-1)
    return np.where(total > 0, weighted / np.where(total > 0, total, 1.0), np.nan)


def add_global_temperature(ds: xr.Dataset) -> xr.Dataset:
    """Global T (n-weighted mean over layers) and its spread across layers (equipartition test)."""
    temp = ds.temperature.values
    n = ds.n_params.values.astype(np.float64)
    mean = _weighted_mean(temp, n)
    var = _weighted_mean((temp - mean[:, None]) ** 2, n)
    spread = np.where(mean > 0, np.sqrt(var) / np.where(mean > 0, mean, 1), np.nan)
    return ds.assign(global_temperature=("step", mean), temperature_spread=("step", spread))
