"""Derived thermodynamics of a measured store (stage ``thermo``): no checkpoint I/O.

Each ``add_*`` takes one run's Dataset and returns it with new variables computed by the pure
estimators in ``pipeline.estimators``; ``sweep_dataset`` fits across runs. Formulas, units
and sources: METHODS.md.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .estimators.displacement import diffusivity_from_band, temperature_from_diffusivity, window_learning_rate
from .estimators.ensemble import ensemble_entropy
from .store import annotate, register

register("diffusivity", "weight^2/param/step", "noise diffusivity D (MSD-vs-lag, drift removed)", "displacement.diffusivity_from_band")
register("diffusivity_err", "weight^2/param/step", "1-sigma uncertainty of the diffusivity", "displacement.diffusivity_from_band")
register("temperature_identifiable", "1", "checkpoint spacing resolves the diffusion (1) or not (0)", "displacement.diffusivity_from_band")
register("drift_speed2", "weight^2/param/step^2", "squared drift (river) speed per parameter", "displacement.diffusivity_from_band")
register("window_learning_rate", "weight^2/loss", "mean learning rate over the temperature window", "displacement.window_learning_rate")
register("temperature", "loss", "local temperature T = D / (2 lr)", "displacement.temperature_from_diffusivity")
register("temperature_err", "loss", "1-sigma uncertainty of the local temperature", "displacement.temperature_from_diffusivity")
register("global_temperature", "loss", "n_params-weighted mean of layer temperatures", "thermo.add_global_temperature")
register("temperature_spread", "1", "n_params-weighted coefficient of variation of T across layers (0 at equipartition)", "thermo.add_global_temperature")
register("ensemble_entropy", "nats", "trajectory ensemble entropy of the window (diagonal Gaussian, extensive)", "ensemble.ensemble_entropy")


def _per_layer(ds: xr.Dataset, fn) -> dict[str, np.ndarray]:
    """Apply ``fn(layer_index) -> dict of arrays over step`` to every layer; stack on layer."""
    parts = [fn(j) for j in range(ds.sizes["layer"])]
    return {k: np.stack([p[k] for p in parts], axis=1) for k in parts[0]}


def add_temperature(ds: xr.Dataset, window: int) -> xr.Dataset:
    """Diffusivity and local temperature per (step, layer) from the squared-distance band."""
    window = max(1, min(int(window), ds.sizes["lag"]))
    steps = ds.step.values
    band = ds.sq_distance.values
    n_params = ds.n_params.values
    est = _per_layer(ds, lambda j: diffusivity_from_band(steps, band[:, j, :], int(n_params[j]), window))
    lr = window_learning_rate(steps, ds.log_step.values, ds.log_learning_rate.values, window)
    temp, temp_err = temperature_from_diffusivity(est["diffusivity"], est["diffusivity_err"], lr[:, None])
    dims = ("step", "layer")
    return ds.assign(
        diffusivity=(dims, est["diffusivity"]), diffusivity_err=(dims, est["diffusivity_err"]),
        temperature_identifiable=(dims, est["identifiable"].astype(np.int8)),
        drift_speed2=(dims, est["drift_speed2"]), window_learning_rate=("step", lr),
        temperature=(dims, temp), temperature_err=(dims, temp_err),
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


def add_ensemble_entropy(ds: xr.Dataset) -> xr.Dataset:
    """Extensive trajectory-ensemble entropy per (window, layer) from the measured log-variances."""
    ent = ensemble_entropy(ds.ensemble_log_var.values, ds.n_params.values[None, :])
    return ds.assign(ensemble_entropy=(("window", "layer"), np.asarray(ent, dtype=np.float64)))


def derive_run(ds: xr.Dataset, params: dict) -> xr.Dataset:
    """All per-run derived quantities, in dependency order."""
    ds = add_temperature(ds, params.get("temperature_window", 8))
    ds = add_global_temperature(ds)
    ds = add_ensemble_entropy(ds)
    return annotate(ds)


def derive(tree: xr.DataTree, params: dict) -> xr.DataTree:
    """Measured tree -> tree with derived variables on every run node (+ ``sweep`` node)."""
    nodes = {"/": tree.to_dataset(inherit=False)}
    runs = {name: derive_run(child.to_dataset(inherit=False), params)
            for name, child in tree.children.items() if name != "sweep"}
    nodes.update({f"/{name}": ds for name, ds in runs.items()})
    return xr.DataTree.from_dict(nodes)
