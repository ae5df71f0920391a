"""The results store: a Zarr-backed ``xarray.DataTree`` with one node per run (+ ``sweep``).

Writes are atomic: the tree is written to a sibling temporary folder and swapped into place,
so a failed or killed run leaves any previous store byte-identical. Every variable carries
``units``, ``long_name`` and ``estimator`` attrs from ``VARIABLES``, the single registry.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from .atomic import replace_dir

# name -> (units, long_name, estimator). Units of weights are the checkpoint's own ("weight").
VARIABLES: dict[str, tuple[str, str, str]] = {
    "weight_mean": ("weight", "mean of the layer's values", "moments"),
    "weight_rms": ("weight", "root mean square of the layer's values", "moments"),
    "weight_entropy": ("nats/param", "differential entropy of the value distribution", "entropy.differential_entropy"),
    "gaussian_entropy": ("nats/param", "entropy of a Gaussian with the same variance", "entropy.gaussian_entropy"),
    "non_gaussianity": ("nats/param", "Gaussian entropy minus value entropy (>= 0)", "entropy"),
    "nonfinite_count": ("count", "NaN or Inf values in the layer", "moments"),
    "rounding_noise_var": ("weight^2", "variance per value of the storage dtype's rounding (ulp^2/12)", "displacement.rounding_noise_var"),
    "sq_distance": ("weight^2", "squared distance to the checkpoint lag steps back, summed over the layer", "displacement.sq_distance_band"),
    "msd": ("weight^2/param", "mean squared displacement since the previous checkpoint", "displacement"),
    "ensemble_log_var": ("ln(weight^2)", "sum over coordinates of ln Var of detrended values in the window", "ensemble.window_log_var_sum"),
    "ensemble_frozen": ("count", "coordinates left out of ensemble_log_var as frozen (no resolvable fluctuation)", "ensemble.window_statistics"),
    "spectral_entropy": ("1", "spectral entropy normalised by ln(rank) (WeightWatcher)", "spectral.spectral_metrics"),
    "stable_rank": ("1", "stable rank sum(s^2)/max(s^2) (WeightWatcher)", "spectral.spectral_metrics"),
    "log_loss": ("loss", "training loss from the run's log", "log"),
    "log_learning_rate": ("weight^2/loss", "learning rate from the run's log", "log"),
}


def register(name: str, units: str, long_name: str, estimator: str) -> None:
    """Add a derived variable's metadata to the registry (called by the modules that make it)."""
    VARIABLES[name] = (units, long_name, estimator)


def annotate(ds: xr.Dataset) -> xr.Dataset:
    """Set units/long_name/estimator on every data variable from the registry."""
    for name in ds.data_vars:
        if name not in VARIABLES:
            raise KeyError(f"variable {name!r} has no entry in pipeline.store.VARIABLES")
        units, long_name, estimator = VARIABLES[name]
        ds[name].attrs.update(units=units, long_name=long_name, estimator=estimator)
    return ds


def write_tree(tree: xr.DataTree, path) -> Path:
    """Write ``tree`` to ``path`` atomically (temp folder + rename swap)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with warnings.catch_warnings():  # zarr 3: fixed-width strings, consolidated metadata
            warnings.simplefilter("ignore", UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"zarr\.")  # UnstableSpecificationWarning
            tree.to_zarr(tmp, mode="w", consolidated=True, encoding=_encodings(tree))
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _encodings(tree: xr.DataTree) -> dict:
    """One chunk per variable: a store stays a few files whatever its steps x layers."""
    enc = {}
    for node in tree.subtree:
        ds = node.to_dataset(inherit=False)
        enc[node.path] = {name: {"chunks": ds[name].shape or None} for name in ds.data_vars if ds[name].ndim}
    return {k: v for k, v in enc.items() if v}


def _clean_leftovers(path: Path) -> None:
    """Remove temp folders of killed writers (their pid is gone); restore an old store that a
    writer killed between its two renames left aside."""
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        pid = leftover.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(leftover, ignore_errors=True)
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    if olds and not path.exists():
        os.replace(olds[-1], path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def open_tree(path) -> xr.DataTree:
    """Open a store written by ``write_tree`` (lazy, Zarr-backed)."""
    if not Path(path).is_dir():
        from .errors import InputError

        raise InputError(path, "no thermoscope store here (run `thermoscope analyze` or `dvc repro` first)")
    return xr.open_datatree(Path(path), engine="zarr")


def node_name(run_name: str) -> str:
    """A DataTree-safe node name for a run (no '/')."""
    return run_name.replace("/", "_") or "run"


def relative_difference(values, reference) -> float:
    """Largest absolute difference between two arrays, divided by the reference's largest finite
    magnitude (dimensionless; 0 = equal). ``inf`` where the shapes or the NaN/Inf entries
    differ; NaN where neither holds a finite value (nothing to compare)."""
    a, b = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape:
        return float("inf")
    finite = np.isfinite(b)
    if not (np.isfinite(a) == finite).all() or not np.array_equal(a[~finite], b[~finite], equal_nan=True):
        return float("inf")
    if not finite.any():
        return float("nan")
    diff, scale = np.abs(a[finite] - b[finite]).max(), np.abs(b[finite]).max()
    return 0.0 if diff == 0 else diff / scale if scale > 0 else float("inf")


def largest_differences(tree: xr.DataTree, reference: xr.DataTree) -> dict[str, float]:
    """``relative_difference`` of each numeric variable of each node (key ``node/variable``);
    ``inf`` for a variable missing from ``tree``. Shows that two stores of the same series
    agree, e.g. measured with torch on the CPU and on a GPU."""
    out = {}
    for node in reference.subtree:
        for name, ref in node.dataset.data_vars.items():
            if np.issubdtype(ref.dtype, np.number):
                key = f"{node.path.strip('/') or '/'}/{name}"
                try:
                    out[key] = relative_difference(tree[node.path].dataset[name].values, ref.values)
                except KeyError:
                    out[key] = float("inf")
    return out
