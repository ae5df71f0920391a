"""Measured layer results -> the measured store: one (step, layer[, lag | window]) Dataset
per run under a root node that records the source, the skipped files and the settings."""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from pipeline import __version__
from pipeline.core.manifest import Manifest, Run
from pipeline.ingest.lora import lora_part
from pipeline.settings import MeasureSettings
from pipeline.store.zarr_io import annotate, node_name


def _log_on_steps(run: Run, field: str) -> np.ndarray:
    """The log's ``field`` at each checkpoint step (NaN where not logged)."""
    logged = dict(zip(run.log.step, getattr(run.log, field)))
    return np.array([logged.get(s, np.nan) for s in run.steps], dtype=np.float64)


def run_dataset(run: Run, layers: dict[str, dict], settings: MeasureSettings) -> xr.Dataset:
    """The measured variables of one run as a (step, layer[, lag | window]) Dataset."""
    names = [t.name for t in run.tensors]
    per_step = {}
    for var in (
        "weight_mean",
        "weight_rms",
        "weight_entropy",
        "gaussian_entropy",
        "non_gaussianity",
        "nonfinite_count",
        "rounding_noise_var",
        "on_bf16_grid",
        "bf16_noise_var",
        "spectral_entropy",
        "stable_rank",
    ):
        if any(var in layers[n] for n in names):  # e.g. spectral: NaN for 1-D layers
            n_steps = len(run.steps)
            per_step[var] = (
                ("step", "layer"),
                np.stack([layers[n].get(var, np.full(n_steps, np.nan)) for n in names], axis=1),
            )
    band = np.stack([layers[n]["sq_distance"] for n in names], axis=1)
    n_params = np.array([t.n_params for t in run.tensors])
    per_step["sq_distance"] = (("step", "layer", "lag"), band)
    per_step["msd"] = (("step", "layer"), band[:, :, 0] / n_params)
    per_step.update(_optimizer_variables(run, layers, band.shape))
    n_windows = min(len(layers[n]["ensemble_log_var"]) for n in names)
    for var in ("ensemble_log_var", "ensemble_frozen"):
        per_step[var] = (
            ("window", "layer"),
            np.stack([layers[n][var][:n_windows] for n in names], axis=1).reshape(
                n_windows, len(names)
            ),
        )
    w = settings.ensemble_window
    steps = np.array(run.steps, dtype=np.int64)
    coords = {
        "step": steps,
        "layer": names,
        "lag": np.arange(1, settings.max_lag + 1),
        "n_params": ("layer", n_params),
        "activation": ("layer", [run.activations.get(n, "unknown") for n in names]),
        "is_vector": ("layer", [len(t.shape) < 2 for t in run.tensors]),
        "storage_dtype": ("layer", [t.dtype for t in run.tensors]),
        "depth": ("layer", np.arange(len(names))),
        "learning_rate": ("step", _log_on_steps(run, "learning_rate")),
        "loss": ("step", _log_on_steps(run, "loss")),
        "window": np.arange(n_windows),
        "window_start": ("window", steps[np.arange(n_windows) * w]),
        "window_end": ("window", steps[np.arange(n_windows) * w + w - 1]),
    }
    per_step["log_loss"] = ("log_step", np.asarray(run.log.loss, dtype=np.float64))
    per_step["log_learning_rate"] = (
        "log_step",
        np.asarray(run.log.learning_rate, dtype=np.float64),
    )
    coords["log_step"] = np.asarray(run.log.step, dtype=np.int64)
    coords["fan_in"] = ("layer", np.array([t.row_elems for t in run.tensors]))
    parts = [lora_part(t) for t in run.tensors]
    if any(parts):  # a LoRA adapter series: what each layer is (W0+dW, dW, A, B, "" stored)
        coords["lora_part"] = ("layer", np.array(parts, dtype=str))
    ds = xr.Dataset(per_step, coords=coords)
    if any(parts):
        bases = sorted({t.source.base_file for t in run.tensors if t.source and t.source.base_file})
        ds.attrs["lora_base"] = (
            ", ".join(bases) or "none (the adapted layers are the update dW alone)"
        )
    ds.attrs.update(
        run=run.name,
        path=run.path,
        log_source=run.log.source or "none",
        log_loss_key=run.log.loss_key or "none",
        log_lr_key=run.log.lr_key or "none",
    )
    ds.attrs.update(_optimizer_attrs(run))
    return annotate(ds)


def _optimizer_variables(run: Run, layers: dict, shape: tuple) -> dict:
    """The preconditioned band and P's layer mean (Adam state; NaN without), and per (step,
    layer) the learning rate and momentum (Adam beta1 or SGD momentum) that the optimizer state
    saved with each checkpoint holds (NaN without state)."""
    names = [t.name for t in run.tensors]
    n_params = np.array([t.n_params for t in run.tensors], dtype=np.float64)
    band = np.stack(
        [layers[n].get("sq_distance_precond", np.full(shape[::2], np.nan)) for n in names], axis=1
    )
    total = np.stack(
        [layers[n].get("precond_sum", np.full(shape[0], np.nan)) for n in names], axis=1
    )
    lr = np.full(shape[:2], np.nan)
    momentum = np.full(shape[:2], np.nan)
    group = run.optimizer.get("group", {})
    adam = run.optimizer.get("kind") in ("adam", "adamw")
    for i, c in enumerate(run.checkpoints):
        for j, n in enumerate(names):
            if c.optimizer and n in group:
                g = c.optimizer["groups"][group[n]]
                lr[i, j] = g["lr"]
                momentum[i, j] = g["beta1"] if adam else g["momentum"]
    return {
        "sq_distance_precond": (("step", "layer", "lag"), band),
        "precond_mean": (("step", "layer"), total / n_params),
        "optimizer_lr": (("step", "layer"), lr),
        "optimizer_momentum": (("step", "layer"), momentum),
    }


def _optimizer_attrs(run: Run) -> dict:
    """Run attributes: optimizer kind, the evidence for it, the fallback note, the mapping's
    source and checks, the Nesterov flag and the logged gradient norms (for clipping)."""
    opt = run.optimizer
    states = [c.optimizer for c in run.checkpoints if c.optimizer]
    nesterov = bool(states and states[-1]["groups"][0].get("nesterov"))
    return {
        "optimizer": opt.get("kind", "unknown"),
        "optimizer_evidence": opt.get("evidence", "none"),
        "optimizer_note": opt.get("note", ""),
        "optimizer_mapping": json.dumps(
            {"source": opt.get("mapping_source", ""), "check": opt.get("mapping_check", {})}
        ),
        "optimizer_nesterov": int(nesterov),
        "grad_norm_log": json.dumps(opt.get("grad_norm", [])),
    }


def measured_tree(manifest: Manifest, results: dict, settings: MeasureSettings) -> xr.DataTree:
    """Root (attrs) + one node per run."""
    nodes = {
        "/": xr.Dataset(
            attrs={
                "thermoscope_version": __version__,
                "source": manifest.root,
                "skipped": json.dumps(manifest.skipped),
                "spectral": int(settings.spectral),
                "spectral_every": int(settings.spectral_every),
            }
        )
    }
    for run in manifest.runs:
        nodes[f"/{node_name(run.name)}"] = run_dataset(run, results[run.name], settings)
    return xr.DataTree.from_dict(nodes)
