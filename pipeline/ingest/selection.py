"""Which checkpoints and layers to analyse (``--steps``, ``--layers``; params.yaml
``checkpoints.steps`` / ``checkpoints.layers``), and what reading them will cost.

Steps: ``"START:STOP"`` keeps the checkpoints whose step is in [START, STOP] (either end may be
left out), ``"::K"`` every K-th checkpoint (the first, then every K-th after it, by position),
``"START:STOP:K"`` both. Layers: comma-separated globs (``"*attn*,lm_head.weight"``) or a
regular expression written ``"re:<pattern>"`` (searched in the tensor name).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import replace

from pipeline.core.errors import InputError
from pipeline.core.manifest import Manifest, Run, TensorInfo
from pipeline.ingest.safetensors_io import DTYPES


def parse_steps(spec: str) -> tuple[int | None, int | None, int]:
    """(first step, last step, every k-th) of a ``--steps`` value; ``InputError`` if malformed."""
    parts = str(spec).strip().split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        lo, hi = (int(p) if p.strip() else None for p in parts[:2])
        k = int(parts[2]) if len(parts) == 3 and parts[2].strip() else 1
        if k < 1:
            raise ValueError
    except ValueError:
        raise InputError(
            "--steps", f"{spec!r} is not START:STOP, ::K or START:STOP:K (integers, K >= 1)"
        ) from None
    return lo, hi, k


def layer_matcher(spec: str):
    """Predicate on tensor names for a ``--layers`` value (globs, or ``re:<regex>``)."""
    spec = str(spec).strip()
    if spec.startswith("re:"):
        try:
            pattern = re.compile(spec[3:])
        except re.error as e:
            raise InputError("--layers", f"bad regular expression {spec[3:]!r} ({e})") from None
        return lambda name: pattern.search(name) is not None
    globs = [g.strip() for g in spec.split(",") if g.strip()]
    return lambda name: any(fnmatch.fnmatchcase(name, g) for g in globs)


def select_run(run: Run, steps: str | None = None, layers: str | None = None) -> Run:
    """``run`` with only the selected checkpoints and tensors; ``InputError`` when a selection
    leaves nothing (it names the run and what there was to choose from)."""
    checkpoints, tensors = run.checkpoints, run.tensors
    if steps:
        lo, hi, k = parse_steps(steps)
        kept = [
            c for c in checkpoints if (lo is None or c.step >= lo) and (hi is None or c.step <= hi)
        ]
        checkpoints = kept[::k]
        if not checkpoints:
            raise InputError(
                run.path,
                f"--steps {steps} selects no checkpoint (steps {run.steps[0]}..{run.steps[-1]})",
            )
    if layers:
        match = layer_matcher(layers)
        tensors = [t for t in tensors if match(t.name)]
        if not tensors:
            some = ", ".join(t.name for t in run.tensors[:3])
            raise InputError(
                run.path, f"--layers {layers} matches no tensor (there are {some}, ...)"
            )
    names = {t.name for t in tensors}
    checkpoints = [
        replace(c, files={n: f for n, f in c.files.items() if n in names}) for c in checkpoints
    ]
    return replace(run, checkpoints=checkpoints, tensors=tensors)


def select(manifest: Manifest, steps: str | None = None, layers: str | None = None) -> Manifest:
    """The manifest with every run's selection applied (unchanged when both are empty)."""
    if not steps and not layers:
        return manifest
    return replace(manifest, runs=[select_run(r, steps, layers) for r in manifest.runs])


def bytes_to_read(runs: list[Run]) -> int:
    """Bytes of tensor data the measurement reads: every selected tensor of every selected
    checkpoint, once."""
    return sum(_tensor_bytes(t, len(r.checkpoints)) for r in runs for t in r.tensors)


def _tensor_bytes(t: TensorInfo, n_checkpoints: int) -> int:
    """A stored tensor's data at each checkpoint; a LoRA layer's A and B at each and its base
    weight W0 once (the same rows at every checkpoint come from the page or disk cache)."""
    if t.source is not None:
        return n_checkpoints * t.source.factor_bytes + t.source.base_bytes
    return n_checkpoints * t.n_params * DTYPES[t.dtype].itemsize
