"""What DVC reads: scalar metrics per run (``metrics.json``) and plot tables (``plots/*.csv``).

``metrics.json`` is flat, ``{"<run>.<metric>": number}``, finite values only (JSON has no
NaN). Plot tables: ``<run>.global.csv`` (step, global_temperature, loss, learning_rate),
``<run>.layer_temperature.csv`` (step, layer, temperature), the same two for all runs
together with a ``run`` column (``global.csv``, ``layer_temperature.csv``) and, with a sweep,
``sweep.temperature_vs_lr.csv`` (run, lr, temperature).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import xarray as xr

from pipeline.report.data import (
    SWEEP,
    equilibrium_steps,
    last_finite,
    nanmean,
    peak,
    run_names,
    sweep_points,
    values,
)


def run_metrics(ds: xr.Dataset) -> dict[str, float]:
    """Scalar metrics of one run (NaN where the input is missing)."""
    steps = ds["step"].values
    m = {"n_steps": float(ds.sizes["step"]), "n_layers": float(ds.sizes.get("layer", 0))}
    gt = values(ds, "global_temperature")
    if gt is not None:
        m["global_temperature_last_step"], m["global_temperature_last"] = last_finite(steps, gt)
        m["global_temperature_peak_step"], m["global_temperature_peak"] = peak(steps, gt)
    spread = values(ds, "temperature_spread")
    if spread is not None:
        m["temperature_spread_last"] = last_finite(steps, spread)[1]
    loss = values(ds, "loss")
    if loss is not None:
        m["final_loss"] = last_finite(steps, loss)[1]
        m["min_loss"] = float(np.nanmin(loss)) if np.isfinite(loss).any() else np.nan
    m["mean_temperature"] = nanmean(values(ds, "temperature"))
    m["mean_weight_entropy"] = nanmean(values(ds, "weight_entropy"))
    nf = values(ds, "nonfinite_count")
    if nf is not None:
        m["nonfinite_total"] = float(np.nansum(nf))
    eq = equilibrium_steps(ds)
    if eq is not None:
        m["equilibrated_layers"] = float(np.isfinite(eq).sum())
    for key in ("global_temperature_last", "global_temperature_peak", "mean_temperature"):
        if m.get(key, 0.0) > 0:  # temperatures are often ~1e-6 loss units: DVC shows 5 decimals
            m[f"log10_{key}"] = float(np.log10(m[key]))
    return m


def compute_metrics(runs: dict[str, xr.Dataset], sweep: xr.Dataset | None) -> dict[str, float]:
    """Flat ``{"<run>.<metric>": value}``; finite values only (JSON has no NaN)."""
    flat = {f"{run}.{k}": v for run, ds in runs.items() for k, v in run_metrics(ds).items()}
    if sweep is not None:
        for var in ("fit_b", "fit_k"):
            if var in sweep and sweep[var].size == 1:
                flat[f"{SWEEP}.{var}"] = float(sweep[var].values)
    return {k: float(v) for k, v in flat.items() if np.isfinite(v)}


def safe_name(name: str) -> str:
    """A run name usable as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "run"


def run_tables(ds: xr.Dataset) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """One run's global table (per step) and layer-temperature table (long form, or None)."""
    cols = {"step": ds["step"].values}
    for var in ("global_temperature", "loss", "learning_rate"):
        if var in ds.variables and ds[var].dims == ("step",):
            cols[var] = ds[var].values.astype(float)
    layer = None
    if "temperature" in ds and set(ds["temperature"].dims) == {"step", "layer"}:
        layer = (
            ds["temperature"]
            .transpose("step", "layer")
            .to_series()
            .rename("temperature")
            .reset_index()[["step", "layer", "temperature"]]
        )
    return pd.DataFrame(cols), layer


def plot_tables(runs: dict[str, xr.Dataset], sweep: xr.Dataset | None) -> dict[str, pd.DataFrame]:
    """DVC plot tables keyed by file name under ``plots/``: per run, all runs, and the sweep."""
    tables, combined = {}, {"global.csv": [], "layer_temperature.csv": []}
    for run, ds in runs.items():
        glob, layer = run_tables(ds)
        tables[f"{safe_name(run)}.global.csv"] = glob
        combined["global.csv"].append(glob.assign(run=run))
        if layer is not None:
            tables[f"{safe_name(run)}.layer_temperature.csv"] = layer
            combined["layer_temperature.csv"].append(layer.assign(run=run))
    tables.update(
        {name: pd.concat(parts, ignore_index=True) for name, parts in combined.items() if parts}
    )
    points = sweep_points(sweep)
    if points is not None:
        lr, temp = points
        tables[f"{SWEEP}.temperature_vs_lr.csv"] = pd.DataFrame(
            {"run": run_names(sweep, lr.dims[0]), "lr": lr.values, "temperature": temp.values}
        )
    return tables
