"""Streaming measurement of one (run, layer, row block): each checkpoint byte is read once.

A task receives file paths (never open handles), walks the checkpoints in step order and keeps
only what the estimators need: the current block, the previous ``max_lag`` blocks (for the
squared-distance band), per-coordinate ensemble-window accumulators and a fixed random subsample
of coordinates (for the value-distribution entropy). It returns small per-step arrays.
``finalize_layer`` merges the blocks of one layer into per-step layer statistics.
"""

from __future__ import annotations

import zlib
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from .estimators.displacement import rounding_noise_var, sq_distance_band
from .estimators.ensemble import window_statistics
from .estimators.entropy import differential_entropy, entropy_subsample_indices, gaussian_entropy
from .manifest import TensorInfo
from .safetensors_io import read_rows


# storage dtypes whose rounding noise matters for displacements (exact round trip from fp32)
STORAGE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass(frozen=True)
class MeasureSettings:
    """Knobs of the measure stage (all from params.yaml ``measure``)."""

    max_lag: int = 8  # checkpoints back for the squared-distance band
    entropy_sample: int = 2**16  # coordinates per layer for the entropy (same at every step; ~3e-3 nats)
    block_elems: int = 2**22  # elements per row block: memory per task ~ block x 4 B x (max(max_lag, ensemble_window) + 1)
    ensemble_window: int = 8  # checkpoints per ensemble-entropy window
    spectral: bool = False  # SVD metrics of 2-D+ weights (a 2-D layer is then one block)
    device: str = "auto"  # "auto": cuda where the worker sees a GPU


@dataclass(frozen=True)
class BlockTask:
    """One unit of work: rows [start, stop) of ``tensor`` through checkpoints ``files``."""

    run: str
    tensor: TensorInfo
    start: int
    stop: int
    files: tuple[str, ...]  # file holding the tensor, one per checkpoint in step order
    steps: tuple[int, ...]
    resume_from: int = 0  # checkpoints before this index are already measured (cached)

    def read_from(self, settings: "MeasureSettings") -> int:
        """First checkpoint to read: enough history for the band and the open ensemble window."""
        window_start = (self.resume_from // settings.ensemble_window) * settings.ensemble_window
        return max(0, min(self.resume_from - settings.max_lag, window_start))


def layer_blocks(tensor: TensorInfo, settings: MeasureSettings) -> list[tuple[int, int]]:
    """Row ranges that split ``tensor`` into blocks of about ``block_elems`` elements."""
    rows = tensor.rows
    if settings.spectral and len(tensor.shape) >= 2:
        return [(0, rows)]
    per_block = max(1, settings.block_elems // tensor.row_elems)
    return [(a, min(a + per_block, rows)) for a in range(0, rows, per_block)]


def _layer_seed(name: str) -> int:
    return zlib.crc32(name.encode())


def measure_block(task: BlockTask, settings: MeasureSettings) -> dict:
    """Stream one row block through the checkpoints; return per-step partial statistics.

    Per-step arrays cover checkpoints ``resume_from ..`` (earlier ones are read only to prime the
    lag buffer and the open ensemble window): ``count`` finite values, ``sum`` / ``sumsq`` of
    finite values (weight, weight^2; float64), ``nonfinite``, ``sq_distance`` (n, max_lag)
    weight^2, ``sample`` (n, k) float32 values of a fixed random coordinate subset, and
    ``spectral`` (n, 2) when on; ``ensemble_log_var`` holds one value per completed window
    starting at or after the window containing ``resume_from``.

    Memory: max(max_lag, ensemble_window) + 1 fp32 blocks, reused from checkpoint to checkpoint
    (each checkpoint is read straight into the oldest one); the ensemble window is computed from
    the held blocks when it closes, so no per-coordinate accumulators are kept.
    """
    device = resolve_device(settings.device)
    first, read_from = task.resume_from, task.read_from(settings)
    w = settings.ensemble_window
    n_out = len(task.files) - first
    n_block = (task.stop - task.start) * task.tensor.row_elems
    share = max(1, round(settings.entropy_sample * n_block / max(task.tensor.n_params, 1)))
    pick = entropy_subsample_indices(n_block, share, _layer_seed(task.tensor.name) + task.start).to(device)
    out = {
        "count": np.zeros(n_out), "sum": np.zeros(n_out), "sumsq": np.zeros(n_out),
        "nonfinite": np.zeros(n_out, dtype=np.int64),
        "sq_distance": np.full((n_out, settings.max_lag), np.nan),
        "sample": np.zeros((n_out, len(pick)), dtype=np.float32),
    }
    spectral = settings.spectral and len(task.tensor.shape) >= 2
    if spectral:
        out["spectral"] = np.full((n_out, 2), np.nan)
    held: deque[tuple[torch.Tensor, bool]] = deque(maxlen=max(settings.max_lag, w))  # (block, finite)
    windows, spare = [], None  # spare: the block that left ``held`` last, read into next
    for i in range(read_from, len(task.files)):
        block = _read_block(task, i, spare).to(device)
        flat = block.reshape(-1)
        moments = _moments(flat)
        if i >= first:
            j = i - first
            out["count"][j], out["nonfinite"][j], out["sum"][j], out["sumsq"][j] = moments
            out["sample"][j] = flat[pick].cpu().numpy()
            if held:
                lagged = [b for b, _ in reversed(held)][: settings.max_lag]
                out["sq_distance"][j, : len(lagged)] = sq_distance_band(flat, lagged)
            if spectral and moments[1] == 0:
                out["spectral"][j] = _spectral(block)
        if len(held) == held.maxlen and device == "cpu":
            spare = held[0][0]  # evicted by the append below
        held.append((flat, moments[1] == 0))
        if (i + 1) % w == 0 and i + 1 - w >= (first // w) * w and len(held) >= w:
            window = [b if ok else torch.nan_to_num(b, nan=0.0, posinf=0.0, neginf=0.0)
                      for b, ok in list(held)[-w:]]
            windows.append(window_statistics(window, task.steps[i + 1 - w : i + 1]))
    out["ensemble_log_var"] = np.asarray([lv for lv, _ in windows], dtype=np.float64)
    out["ensemble_frozen"] = np.asarray([n for _, n in windows], dtype=np.int64)
    out["dtype"] = task.tensor.dtype
    return out


_CHUNK = 1 << 16  # elements reduced in fp32 before accumulating in float64


def _moments(flat: torch.Tensor) -> tuple[float, int, float, float]:
    """(finite count, non-finite count, sum, sum of squares) of a block: fp32 chunk reductions
    accumulated in float64; the masked path runs only when a chunk holds NaN/Inf."""
    total, total_sq, bad = 0.0, 0.0, 0
    chunk = _CHUNK if flat.device.type == "cpu" else max(flat.numel(), 1)
    for start in range(0, flat.numel(), chunk):
        c = flat[start : start + chunk]
        s, ss = float(c.sum()), float(torch.dot(c, c))
        if not (np.isfinite(s) and np.isfinite(ss)):
            finite = torch.isfinite(c)
            bad += int((~finite).sum())
            c = torch.where(finite, c, torch.zeros((), device=c.device))
            s, ss = float(c.sum()), float(torch.dot(c, c))
        total += s
        total_sq += ss
    return float(flat.numel() - bad), bad, total, total_sq


def _read_block(task: BlockTask, i: int, out: torch.Tensor | None) -> torch.Tensor:
    """Rows [start, stop) of checkpoint ``i`` as fp32, read into ``out`` (reused) when given."""
    shape = (task.stop - task.start, *task.tensor.shape[1:])
    return read_rows(task.files[i], task.tensor.name, task.start, task.stop, out=out).reshape(shape)


def _spectral(block: torch.Tensor) -> tuple[float, float]:
    """(spectral entropy, stable rank) of a whole 2-D+ weight (flattened to rows x rest)."""
    from .estimators.spectral import singular_values, spectral_metrics  # optional SVD path

    matrix = block.reshape(block.shape[0], -1)
    return spectral_metrics(singular_values(matrix), *matrix.shape)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` on a worker that sees a GPU, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def finalize_layer(blocks: list[dict]) -> dict:
    """Merge the row blocks of one layer into per-step layer statistics (see docs/INTERNALS.md)."""
    total = {k: sum(b[k] for b in blocks)
             for k in ("count", "sum", "sumsq", "nonfinite", "sq_distance", "ensemble_log_var", "ensemble_frozen")}
    count = np.where(total["count"] > 0, total["count"], np.nan)
    mean = total["sum"] / count
    var = np.maximum(total["sumsq"] / count - mean**2, 0.0)
    sample = np.concatenate([b["sample"] for b in blocks], axis=1)
    entropy = np.array([differential_entropy(torch.from_numpy(row)) for row in sample])
    storage = STORAGE_DTYPES.get(blocks[0]["dtype"], torch.float64)
    rounding = np.array([rounding_noise_var(torch.from_numpy(row).to(storage)) for row in sample])
    gauss = gaussian_entropy(np.where(var > 0, var, np.nan))
    result = {
        "weight_mean": mean,
        "weight_rms": np.sqrt(total["sumsq"] / count),
        "weight_entropy": entropy,
        "gaussian_entropy": gauss,
        "non_gaussianity": gauss - entropy,
        "nonfinite_count": total["nonfinite"],
        "rounding_noise_var": rounding,
        "sq_distance": total["sq_distance"],
        "ensemble_log_var": total["ensemble_log_var"],
        "ensemble_frozen": total["ensemble_frozen"],
    }
    if "spectral" in blocks[0]:
        result["spectral_entropy"] = blocks[0]["spectral"][:, 0]
        result["stable_rank"] = blocks[0]["spectral"][:, 1]
    return result
