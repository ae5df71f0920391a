"""Which band and which step size give a run's temperature: the optimizer decides.

``temperature_relation`` reads the run's optimizer (measured attrs: the kind found in the
optimizer state, the evidence for it, the fallback note) or the ``thermo.optimizer`` setting,
and returns the estimator to use: the band (``sq_distance``, or ``sq_distance_precond`` for
Adam), the white measurement noise in that band's units, the step size eta per (step, layer)
and the momentum offset; or a refusal with its reason (the run then gets D and D/lr^2, never a
loss-unit temperature). METHODS.md 3b.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import xarray as xr

from pipeline.core.manifest import ADAM_KINDS, SGD_KINDS
from pipeline.core.windows import spacing_refusal
from pipeline.estimators.preconditioned import (
    clip_fraction,
    clip_refusal,
    effective_step,
    momentum_offset_steps,
)

OPTIMIZERS = ("auto", *SGD_KINDS, *ADAM_KINDS)


@dataclass
class Relation:
    """How the run's temperature is formed (``estimator``) or why it is not (``refusal``)."""

    optimizer: str  # the kind used (or "unknown")
    source: str  # "state" | "setting" | "assumed"
    estimator: str  # "einstein_sgd" | "heavy_ball" | "nesterov" | "preconditioned_adam" | "none"
    refusal: str = ""
    band: np.ndarray | None = None  # (step, layer, lag)
    noise: np.ndarray | None = None  # (layer,) white noise per coordinate in the band's units
    eta: np.ndarray | None = None  # (step, layer) step size per checkpoint (the state's or log's)
    eta_from_state: bool = False  # eta[c] is the step after checkpoint c (scheduler stepped)
    offset_steps: float = 0.0
    clip_fraction: float = float("nan")


def _kind(ds: xr.Dataset, setting: str) -> tuple[str, str]:
    found = ds.attrs.get("optimizer", "unknown")
    evidence = ds.attrs.get("optimizer_evidence", "none")
    if setting != "auto":
        return setting, "setting"
    if evidence == "state" and found != "unknown":
        return found, "state"
    if evidence == "none":
        return "sgd", "assumed"  # no optimizer state, no Trainer files: plain SGD assumed
    return "unknown", "state"


def _spacing_refusal(ds: xr.Dataset, offset: float) -> str:
    """Why the checkpoints are too close for the momentum offset ('' when they are not)."""
    return spacing_refusal(ds.step.values, offset)


def temperature_relation(ds: xr.Dataset, setting: str, max_grad_norm: float | None) -> Relation:
    """The run's temperature estimator (see module docstring)."""
    if setting not in OPTIMIZERS:
        raise ValueError(f"thermo.optimizer {setting!r} is not one of {OPTIMIZERS}")
    kind, source = _kind(ds, setting)
    note = ds.attrs.get("optimizer_note", "")
    clipped = clip_fraction(json.loads(ds.attrs.get("grad_norm_log", "[]")), max_grad_norm)
    rel = Relation(kind, source, "none", clip_fraction=clipped)
    state_lr = ds.optimizer_lr.values if "optimizer_lr" in ds else None
    has_state = state_lr is not None and np.isfinite(state_lr).any()
    noise = ds.rounding_noise_var.mean("step").values
    if kind == "unknown":
        rel.refusal = note or "optimizer unknown (no usable optimizer state)"
        return rel
    if kind in ADAM_KINDS:
        band = ds.sq_distance_precond.values if "sq_distance_precond" in ds else None
        if band is None or not np.isfinite(band).any() or not has_state:
            why = f"{kind} needs its optimizer state (exp_avg_sq) for P; none read"
            if "lora_part" in ds.coords:
                why = (
                    f"LoRA run: {kind}'s state preconditions the adapter factors A and B, not "
                    "the layers W0 + dW measured here; temperature falls back to D"
                )
                note = ""
            rel.refusal = f"{why}: {note}" if note and source == "setting" else note or why
            return rel
        beta1 = float(np.nanmedian(ds.optimizer_momentum.values))
        pmean = np.nanmean(ds.precond_mean.values, axis=0)
        rel.estimator, rel.band, rel.noise = "preconditioned_adam", band, noise * pmean
        rel.eta, rel.eta_from_state = state_lr, True
        rel.offset_steps = momentum_offset_steps(kind, beta1)
        rel.refusal = _spacing_refusal(ds, rel.offset_steps)
        return rel
    if has_state:
        mu = float(np.nanmedian(ds.optimizer_momentum.values))
        rel.eta, rel.eta_from_state = effective_step(kind, state_lr, mu), True
    elif kind == "sgd":
        mu = 0.0
    else:
        rel.refusal = f"{kind}: the momentum is unknown without the optimizer state"
        return rel
    rel.estimator = {"sgd": "einstein_sgd", "sgd_momentum": "heavy_ball"}.get(kind, kind)
    if mu == 0.0:
        rel.estimator = "einstein_sgd"
    rel.band, rel.noise = ds.sq_distance.values, noise
    rel.offset_steps = momentum_offset_steps(kind, mu)
    rel.refusal = _spacing_refusal(ds, rel.offset_steps)
    rel.refusal = clip_refusal(clipped, max_grad_norm) or rel.refusal
    return rel
