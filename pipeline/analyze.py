"""The Python API: checkpoint folder -> measured (and derived) DataTree -> Zarr store.

``measure_manifest`` runs the measurement graph on a Dask cluster (reusing cached layers),
``measured_tree`` assembles the per-run datasets, ``analyze`` does index -> measure -> thermo
-> store in one call (what ``thermoscope analyze`` runs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import xarray as xr

from . import __version__
from .cache import LayerCache, merge
from .discovery import discover
from .manifest import Manifest, Run
from .measure import BlockTask, MeasureSettings, layer_blocks
from .parallel import ClusterSettings, check_device, dask_client, dashboard_link, run_tasks
from .store import annotate, node_name, write_tree

Progress = Callable[[str, int, int], None]  # (what, done, total)


def _block_tasks(run: Run, settings: MeasureSettings, resume_from: dict[str, int]) -> dict:
    layers = {}
    steps = tuple(run.steps)
    for tensor in run.tensors:
        if resume_from[tensor.name] >= len(steps):
            continue
        files = tuple(c.files[tensor.name] for c in run.checkpoints)
        layers[(run.name, tensor.name)] = [
            BlockTask(run.name, tensor, a, b, files, steps, resume_from[tensor.name])
            for a, b in layer_blocks(tensor, settings)
        ]
    return layers


def measure_manifest(manifest: Manifest, settings: MeasureSettings, cluster: ClusterSettings,
                     cache_dir, progress: Progress | None = None) -> dict[str, dict[str, dict]]:
    """{run: {tensor: layer result}} for every run and tensor, measuring only what is new."""
    cache = LayerCache(cache_dir, settings)
    runs = {run.name: run for run in manifest.runs}
    cached, todo = {}, {}
    for run in manifest.runs:
        starts = {}
        for tensor in run.tensors:
            cached[(run.name, tensor.name)], starts[tensor.name] = cache.load(run, tensor)
        todo.update(_block_tasks(run, settings, starts))
    results = {k: v for k, v in cached.items() if k not in todo}
    if todo:
        check_device(settings.device, cluster)
        with dask_client(cluster) as client:
            if progress and dashboard_link(client):
                progress(f"dask dashboard: {dashboard_link(client)}", 0, len(todo))
            for done, ((run_name, name), new) in enumerate(run_tasks(client, todo, settings), 1):
                results[(run_name, name)] = merge(cached[(run_name, name)], new)
                cache.save(runs[run_name], todo[(run_name, name)][0].tensor, results[(run_name, name)])
                if progress:
                    progress(f"{run_name}: {name}", done, len(todo))
    out: dict[str, dict[str, dict]] = {}
    for run in manifest.runs:
        out[run.name] = {t.name: results[(run.name, t.name)] for t in run.tensors}
    return out


def _log_on_steps(run: Run, field: str) -> np.ndarray:
    """The log's ``field`` at each checkpoint step (NaN where not logged)."""
    logged = dict(zip(run.log.step, getattr(run.log, field)))
    return np.array([logged.get(s, np.nan) for s in run.steps], dtype=np.float64)


def run_dataset(run: Run, layers: dict[str, dict], settings: MeasureSettings) -> xr.Dataset:
    """The measured variables of one run as a (step, layer[, lag | window]) Dataset."""
    names = [t.name for t in run.tensors]
    per_step = {}
    for var in ("weight_mean", "weight_rms", "weight_entropy", "gaussian_entropy",
                "non_gaussianity", "nonfinite_count", "rounding_noise_var", "spectral_entropy", "stable_rank"):
        if any(var in layers[n] for n in names):  # e.g. spectral: NaN for 1-D layers
            n_steps = len(run.steps)
            per_step[var] = (("step", "layer"), np.stack(
                [layers[n].get(var, np.full(n_steps, np.nan)) for n in names], axis=1))
    band = np.stack([layers[n]["sq_distance"] for n in names], axis=1)
    n_params = np.array([t.n_params for t in run.tensors])
    per_step["sq_distance"] = (("step", "layer", "lag"), band)
    per_step["msd"] = (("step", "layer"), band[:, :, 0] / n_params)
    n_windows = min(len(layers[n]["ensemble_log_var"]) for n in names)
    for var in ("ensemble_log_var", "ensemble_frozen"):
        per_step[var] = (("window", "layer"), np.stack(
            [layers[n][var][:n_windows] for n in names], axis=1).reshape(n_windows, len(names)))
    w = settings.ensemble_window
    steps = np.array(run.steps, dtype=np.int64)
    coords = {
        "step": steps, "layer": names, "lag": np.arange(1, settings.max_lag + 1),
        "n_params": ("layer", n_params),
        "activation": ("layer", [run.activations.get(n, "unknown") for n in names]),
        "is_vector": ("layer", [len(t.shape) < 2 for t in run.tensors]),
        "depth": ("layer", np.arange(len(names))),
        "learning_rate": ("step", _log_on_steps(run, "learning_rate")),
        "loss": ("step", _log_on_steps(run, "loss")),
        "window": np.arange(n_windows),
        "window_start": ("window", steps[np.arange(n_windows) * w]),
        "window_end": ("window", steps[np.arange(n_windows) * w + w - 1]),
    }
    per_step["log_loss"] = ("log_step", np.asarray(run.log.loss, dtype=np.float64))
    per_step["log_learning_rate"] = ("log_step", np.asarray(run.log.learning_rate, dtype=np.float64))
    coords["log_step"] = np.asarray(run.log.step, dtype=np.int64)
    coords["fan_in"] = ("layer", np.array([t.row_elems for t in run.tensors]))
    ds = xr.Dataset(per_step, coords=coords)
    ds.attrs.update(run=run.name, path=run.path, log_source=run.log.source or "none")
    return annotate(ds)


def measured_tree(manifest: Manifest, results: dict, settings: MeasureSettings) -> xr.DataTree:
    """Root (attrs) + one node per run."""
    nodes = {"/": xr.Dataset(attrs={
        "thermoscope_version": __version__, "source": manifest.root,
        "skipped": json.dumps(manifest.skipped), "spectral": int(settings.spectral),
    })}
    for run in manifest.runs:
        nodes[f"/{node_name(run.name)}"] = run_dataset(run, results[run.name], settings)
    return xr.DataTree.from_dict(nodes)


def analyze(path, store, measure: MeasureSettings = MeasureSettings(),
            cluster: ClusterSettings = ClusterSettings(), thermo_params: dict | None = None,
            skip_bad: bool = False, cache_dir=None, progress: Progress | None = None,
            manifest: Manifest | None = None) -> Path:
    """Index, measure and derive the thermodynamics of the checkpoints under ``path``
    (``manifest``: the result of ``discover(path, skip_bad)`` when the caller already has it)."""
    from .thermo import derive  # thermo depends on the measured schema built here

    manifest = manifest or discover(path, skip_bad=skip_bad)
    cache_dir = cache_dir or Path(store).with_name(f".{Path(store).name}.cache")
    results = measure_manifest(manifest, measure, cluster, cache_dir, progress)
    tree = derive(measured_tree(manifest, results, measure), thermo_params or {})
    return write_tree(tree, store)
