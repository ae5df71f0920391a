"""Reading the store for the report: open it, split the tree, and small value helpers.

Everything here returns plain numbers, NumPy arrays or xarray objects; nothing draws or
writes HTML. Sweep-node variables are looked up under several names (see ``SWEEP_LR``,
``SWEEP_TEMPERATURE``, ``FREE_ENERGY_NAMES``) so stores from other tools render too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from pipeline.core.errors import InputError

SWEEP = "sweep"
SWEEP_LR = ("run_learning_rate", "lr")
SWEEP_TEMPERATURE = ("run_temperature", "temperature")
FREE_ENERGY_NAMES = (
    ("internal_energy", "run_ensemble_entropy"),
    ("U", "S"),
    ("internal_energy", "ensemble_entropy"),
)


def open_store(store_path: Path) -> xr.DataTree:
    """Open the store lazily; a missing or unreadable store is an ``InputError``."""
    if not Path(store_path).exists():
        raise InputError(store_path, "store not found (run `thermoscope analyze` first)")
    try:
        return xr.open_datatree(store_path, engine="zarr")
    except Exception as exc:  # zarr raises several unrelated types for a broken store
        raise InputError(store_path, f"cannot open as a Zarr DataTree: {exc}") from exc


def split_tree(
    tree: xr.DataTree, store_path: Path
) -> tuple[dict, dict[str, xr.Dataset], xr.Dataset | None]:
    """Root attrs, run datasets (nodes with a ``step`` dim) and the sweep dataset, loaded.

    The store opens lazily, so damaged chunks surface here: an ``InputError`` naming the store
    and the node (zarr's codecs raise assorted types).
    """
    runs, sweep = {}, None
    for name, child in tree.children.items():
        ds = child.to_dataset()
        if name != SWEEP and "step" not in ds.dims:
            continue
        try:
            ds = ds.load()
        except Exception as exc:
            reason = f"cannot read node '{name}' ({type(exc).__name__}: {str(exc)[:120]})"
            raise InputError(store_path, reason) from exc
        if name == SWEEP:
            sweep = ds
        else:
            runs[name] = ds
    return dict(tree.attrs), runs, sweep


def skipped_files(attrs: dict) -> list[tuple[str, str]]:
    """The root ``skipped`` attr (JSON list of [path, reason], or already a list)."""
    raw = attrs.get("skipped", [])
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else []
        except json.JSONDecodeError:
            return [(raw, "unparsed 'skipped' attribute")]
    return [(str(item[0]), str(item[1]) if len(item) > 1 else "") for item in raw]


def values(ds: xr.Dataset, var: str) -> np.ndarray | None:
    """``ds[var]`` as a float array, or None when the variable is absent."""
    return np.asarray(ds[var].values, float) if var in ds.variables else None


def scalar(ds: xr.Dataset, var: str) -> float:
    """A size-1 variable as a float; NaN when absent or not a scalar."""
    return float(ds[var].values) if var in ds and ds[var].size == 1 else np.nan


def nanmean(array: np.ndarray | None) -> float:
    """Mean of the finite values; NaN when there is none (or no array)."""
    if array is None or not np.isfinite(array).any():
        return np.nan
    return float(np.nanmean(array))


def last_finite(steps: np.ndarray, array: np.ndarray) -> tuple[float, float]:
    """(step, value) of the last finite value; NaNs when there is none."""
    ok = np.flatnonzero(np.isfinite(array))
    return (float(steps[ok[-1]]), float(array[ok[-1]])) if len(ok) else (np.nan, np.nan)


def peak(steps: np.ndarray, array: np.ndarray) -> tuple[float, float]:
    """(step, value) of the largest finite value (first if tied); NaNs when there is none."""
    if not np.isfinite(array).any():
        return np.nan, np.nan
    i = int(np.nanargmax(array))
    return float(steps[i]), float(array[i])


def equilibrium_onset(ds: xr.Dataset) -> xr.DataArray | None:
    """Equilibrium onset step per layer: ``equilibrium_step`` or the first ``equilibrated`` step."""
    if "equilibrium_step" in ds:
        return ds["equilibrium_step"].astype(float)
    if "equilibrated" in ds and "step" in ds["equilibrated"].dims:
        eq = ds["equilibrated"].fillna(False).astype(bool)
        first = eq.argmax("step")
        return xr.where(eq.any("step"), ds["step"].values[first.values], np.nan)
    return None


def equilibrium_steps(ds: xr.Dataset) -> np.ndarray | None:
    """Equilibrium onset step per layer as floats (NaN = never); None when not computed."""
    onset = equilibrium_onset(ds)
    if onset is None:
        return None
    v = np.asarray(onset.values, float)
    return np.where(v >= 0, v, np.nan)


def first_present(ds: xr.Dataset | None, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that is a variable of ``ds``."""
    return next((n for n in names if ds is not None and n in ds.variables), None)


def sweep_points(sweep: xr.Dataset | None) -> tuple[xr.DataArray, xr.DataArray] | None:
    """(learning rate, temperature) per run from the sweep node, when both are there and 1-D."""
    lr, temp = first_present(sweep, SWEEP_LR), first_present(sweep, SWEEP_TEMPERATURE)
    if lr is None or temp is None or sweep[lr].ndim != 1 or sweep[lr].dims != sweep[temp].dims:
        return None
    return sweep[lr], sweep[temp]


def run_names(sweep: xr.Dataset, dim: str) -> np.ndarray:
    """Labels along the sweep's run dimension: its coordinate, else 0, 1, 2, ..."""
    return sweep[dim].values if dim in sweep.coords else np.arange(sweep.sizes[dim])


def find_free_energy(runs, sweep) -> tuple[xr.DataArray, xr.DataArray, list[str]] | None:
    """(U, S, labels) from the sweep node, else from the first run node that has them."""
    nodes = ([(SWEEP, sweep)] if sweep is not None else []) + list(runs.items())
    for _name, ds in nodes:
        for u, s in FREE_ENERGY_NAMES:
            if u in ds and s in ds and ds[u].shape == ds[s].shape:
                da = ds[u]
                labels = (
                    [str(x) for x in da[da.dims[0]].values]
                    if da.ndim == 1 and da.dims[0] in ds.coords
                    else [str(i) for i in range(da.size)]
                )
                return ds[u], ds[s], labels
    return None


def layer_last(ds: xr.Dataset, var: str, order: np.ndarray) -> np.ndarray:
    """Last finite value along ``step`` per layer, in ``order`` (NaN when none or absent)."""
    if var not in ds or set(ds[var].dims) != {"step", "layer"}:
        return np.full(len(order), np.nan)
    v = np.asarray(ds[var].transpose("step", "layer").values, float)[:, order]
    ok = np.isfinite(v)
    last = v.shape[0] - 1 - np.argmax(ok[::-1], axis=0)
    return np.where(ok.any(axis=0), v[last, np.arange(v.shape[1])], np.nan)


def layer_coord(ds: xr.Dataset, var: str, order: np.ndarray, default) -> list:
    """A per-layer coordinate/variable as plain Python values in ``order``."""
    if var not in ds.variables or ds[var].dims != ("layer",):
        return [default] * len(order)
    return [v.item() if hasattr(v, "item") else v for v in np.asarray(ds[var].values)[order]]


def nonfinite_per_layer(ds: xr.Dataset) -> xr.DataArray | None:
    """Non-finite values per layer summed over every other dim; None when not measured."""
    if "nonfinite_count" not in ds:
        return None
    nf = ds["nonfinite_count"].fillna(0)
    other = [d for d in nf.dims if d != "layer"]
    return nf.sum(other) if other else nf
