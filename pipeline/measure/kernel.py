"""Streaming measurement of one (run, layer, row block): each checkpoint byte is read once.

A task receives file paths (never open handles) and walks its row block in cache-sized slices
(on a GPU: the whole block as one slice); each slice goes through the checkpoints in step
order keeping only what the estimators need:
the last max(max_lag, ensemble_window) + 1 values and the last ``max_lag`` increments (for the
squared-distance band and the ensemble windows) and a fixed random subsample of coordinates
(for the value-distribution entropy). It returns small per-step arrays. ``finalize_layer``
merges the blocks of one layer into per-step layer statistics.
"""

from __future__ import annotations

import math
import zlib
from collections import deque

import numpy as np
import torch

from pipeline.estimators.displacement import (
    band_from_increment_dots,
    on_bf16_grid,
    rounding_noise_var,
    sq_distance_band,
)
from pipeline.estimators.ensemble import increment_window_statistics, window_statistics
from pipeline.estimators.entropy import (
    differential_entropy,
    entropy_subsample_indices,
    gaussian_entropy,
)
from pipeline.ingest.safetensors_io import read_block, torch_dtype
from pipeline.measure.tasks import BlockTask, layer_blocks  # noqa: F401 (re-exported)
from pipeline.settings import MeasureSettings


def _layer_seed(name: str) -> int:
    return zlib.crc32(name.encode())


def measure_block(task: BlockTask, settings: MeasureSettings) -> dict:
    """Stream one row block through the checkpoints; return per-step partial statistics.

    Per-step arrays cover checkpoints ``resume_from ..`` (earlier ones are read only to prime the
    lag buffer and the open ensemble window): ``count`` finite values, ``sum`` / ``sumsq`` of
    finite values (weight, weight^2; float64), ``nonfinite``, ``sq_distance`` (n, max_lag)
    weight^2, ``sample`` (n, k) float32 values of a fixed random coordinate subset, and
    ``spectral`` (n, 2) when on; ``ensemble_log_var`` / ``ensemble_frozen`` hold one value per
    completed window starting at or after the window containing ``resume_from``.

    Cache blocking (CPU): the block is walked in slices of about ``slice_elems`` elements, each
    slice streamed through all checkpoints before the next, so the slice's lag buffer stays in
    the CPU cache while the band and the ensemble window are computed; each checkpoint byte is
    read once. All statistics are additive over slices (``merge_partials``). With ``spectral`` a 2-D
    layer is one block and its SVD metrics need the whole matrix: ``_spectral_series`` reads it
    once more per checkpoint into one buffer (the only second read; memory one fp32 copy plus
    the float64 Gram work, instead of a lag buffer of whole matrices).
    """
    on_cpu = (
        resolve_device(settings.device) == "cpu"
    )  # on a GPU, per-slice launches cost more than cache saves
    per_slice = cpu_slice_rows(task, settings) if on_cpu else task.stop - task.start
    space = _Workspace(settings, min(per_slice, task.stop - task.start) * task.tensor.row_elems)
    space.precond = PrecondBand(task, space.ring) if task.precond else None
    pick = _block_sample(task, settings)
    parts = [
        _measure_slice(task, a, min(a + per_slice, task.stop), settings, space, pick)
        for a in range(task.start, task.stop, per_slice)
    ]
    out = merge_partials(parts)
    if settings.spectral and len(task.tensor.shape) >= 2:
        out["spectral"] = _spectral_series(
            task, out["nonfinite"] == 0, resolve_device(settings.device), settings.spectral_every
        )
    out["dtype"] = task.tensor.dtype
    return out


def cpu_slice_rows(task: BlockTask, settings: MeasureSettings) -> int:
    """Rows per cache slice on a CPU: about ``slice_elems`` elements, at least one row."""
    return max(1, settings.slice_elems // task.tensor.row_elems)


def _block_sample(task: BlockTask, settings: MeasureSettings) -> torch.Tensor:
    """Sorted flat indices (within the block) of the entropy subsample: the block's share of
    ``entropy_sample``, drawn per block, so the sampled coordinates do not depend on the slice
    size (which differs by device) and are the same at every checkpoint."""
    n_block = (task.stop - task.start) * task.tensor.row_elems
    share = max(1, round(settings.entropy_sample * n_block / max(task.tensor.n_params, 1)))
    return entropy_subsample_indices(n_block, share, _layer_seed(task.tensor.name) + task.start)


def _spectral_series(
    task: BlockTask, finite: np.ndarray, device: str, every: int = 1
) -> np.ndarray:
    """(spectral entropy, stable rank) per checkpoint from ``resume_from`` on, of the whole 2-D
    layer (``layer_blocks`` makes it one block); NaN where the checkpoint has NaN/Inf in it and
    at checkpoints whose index in the run is not a multiple of ``every``."""
    first = task.resume_from
    out = np.full((len(task.files) - first, 2), np.nan)
    buffer = torch.empty(task.tensor.n_params, dtype=torch.float32)
    for j, i in enumerate(range(first, len(task.files))):
        if finite[j] and i % every == 0:
            matrix = read_block(task.files[i], task.tensor, task.start, task.stop, out=buffer)
            out[j] = _spectral(matrix.reshape(task.stop - task.start, -1).to(device))
    return out


ADDITIVE = (
    "count",
    "sum",
    "sumsq",
    "nonfinite",
    "sq_distance",
    "ensemble_log_var",
    "ensemble_frozen",
    "sq_distance_precond",  # only for tasks with Adam state (PrecondBand)
    "precond_sum",
)


def merge_partials(parts: list[dict]) -> dict:
    """Statistics of the union of disjoint coordinate sets: sums of the additive ones, the
    entropy samples side by side."""
    merged = {k: sum(p[k] for p in parts) for k in ADDITIVE if k in parts[0]}
    merged["sample"] = np.concatenate([p["sample"] for p in parts], axis=1)
    return merged


class _Workspace:
    """Buffers of one task, allocated once and reused by every slice (no allocation, hence no
    page faults, per slice or per checkpoint): ``values`` holds max(max_lag, ensemble_window)
    + 1 slices (checkpoint i is read into row i mod that count, evicting the oldest held one),
    ``ring`` the last max_lag increments; ``staging`` is the host buffer for a GPU worker."""

    def __init__(self, settings: MeasureSettings, capacity: int):
        self.device = resolve_device(settings.device)
        n_values = max(settings.max_lag, settings.ensemble_window) + 1
        self.values = torch.empty((n_values, capacity), dtype=torch.float32, device=self.device)
        self.ring = torch.empty(
            (settings.max_lag, capacity), dtype=torch.float32, device=self.device
        )
        on_gpu = (
            self.device != "cpu"
        )  # page-locked staging: host-to-device copies at full bus speed
        self.staging = (
            torch.empty(capacity, dtype=torch.float32, pin_memory=True) if on_gpu else None
        )

    def read(self, task: BlockTask, i: int, start: int, stop: int, slot: int) -> torch.Tensor:
        """Rows [start, stop) of checkpoint ``i`` as fp32 in row ``slot`` of ``values`` (flat)."""
        n = (stop - start) * task.tensor.row_elems
        target = self.values[slot, :n]
        if self.staging is None:
            return read_block(task.files[i], task.tensor, start, stop, out=target).reshape(-1)
        return target.copy_(
            read_block(task.files[i], task.tensor, start, stop, out=self.staging[:n]).reshape(-1)
        )


def _measure_slice(
    task: BlockTask,
    start: int,
    stop: int,
    settings: MeasureSettings,
    space: _Workspace,
    block_pick: torch.Tensor,
) -> dict:
    """``measure_block``'s statistics for rows [start, stop) of the task's tensor (one slice).

    ``block_pick``: the block's entropy subsample (``_block_sample``), of which the slice keeps
    its own.

    Memory: the task's ``_Workspace`` (max(max_lag, ensemble_window) + 1 value slices and a
    ring of the last ``max_lag`` increments, ``_BandTracker``); the ensemble window is computed
    from the ring when it closes, so no per-coordinate accumulators are kept.
    """
    device = space.device
    first, read_from = task.resume_from, task.read_from(settings)
    w = settings.ensemble_window
    n_out = len(task.files) - first
    n_slice = (stop - start) * task.tensor.row_elems
    offset = (start - task.start) * task.tensor.row_elems
    lo, hi = torch.searchsorted(
        block_pick, torch.tensor([offset, offset + n_slice])
    ).tolist()  # sorted indices
    pick = (block_pick[lo:hi] - offset).to(device)
    pick_np = pick.numpy() if device == "cpu" else None  # numpy's gather: half the overhead
    out = {
        "count": np.zeros(n_out),
        "sum": np.zeros(n_out),
        "sumsq": np.zeros(n_out),
        "nonfinite": np.zeros(n_out, dtype=np.int64),
        "sq_distance": np.full((n_out, settings.max_lag), np.nan),
        "sample": np.zeros((n_out, len(pick)), dtype=np.float32),
    }
    held: deque[tuple[torch.Tensor, bool]] = deque(
        maxlen=max(settings.max_lag, w)
    )  # (slice, finite)
    band = _BandTracker(space.ring[:, :n_slice])
    pband = space.precond.start(n_out, settings.max_lag) if space.precond is not None else None
    windows = []
    for i in range(read_from, len(task.files)):
        flat = space.read(task, i, start, stop, (i - read_from) % space.values.shape[0])
        measured = i >= first  # earlier checkpoints only prime the ring and the open window
        moments = _moments(flat) if measured else None  # priming needs only the finite flag
        finite = moments[1] == 0 if measured else _sums_finite(flat)
        band_row = band.advance(flat, held, finite, need_band=measured)
        if measured:
            j = i - first
            out["count"][j], out["nonfinite"][j], out["sum"][j], out["sumsq"][j] = moments
            out["sample"][j] = (
                flat[pick].cpu().numpy() if pick_np is None else flat.numpy()[pick_np]
            )
            out["sq_distance"][j] = band_row
            if pband is not None:
                pband.measure(j, i, start, stop, band)
        held.append((flat, finite))
        if (i + 1) % w == 0 and i + 1 - w >= (first // w) * w and len(held) >= w:
            windows.append(_close_window(held, band, task.steps[i + 1 - w : i + 1]))
    out["ensemble_log_var"] = np.asarray([lv for lv, _ in windows], dtype=np.float64)
    out["ensemble_frozen"] = np.asarray([n for _, n in windows], dtype=np.int64)
    if pband is not None:
        out["sq_distance_precond"], out["precond_sum"] = pband.band, pband.total
    return out


def _close_window(held: deque, band: _BandTracker, steps) -> tuple[float, int]:
    """Ensemble statistics of the window of the last len(steps) held slices: from the
    increments ring when it holds the window's increments and all of it is finite, else from
    the values (non-finite ones set to 0: those coordinates then count as frozen or fluctuate
    by the jump, and the caller reports the non-finite count)."""
    w = len(steps)
    ref = held[-w][0]
    if band.finite and band.max_lag >= w - 1 and band.count >= w - 1:
        rows = [(band.count - 1 - (w - 1 - j)) % band.max_lag for j in range(1, w)]
        written = band.ring[: min(band.count, band.max_lag)]  # rows of this slice's increments
        return increment_window_statistics(written, rows, steps, ref, chunk=ref.numel())
    window = [
        b if ok else torch.nan_to_num(b, nan=0.0, posinf=0.0, neginf=0.0)
        for b, ok in list(held)[-w:]
    ]
    return window_statistics(window, steps)


class _BandTracker:
    """Squared-distance band of a slice, checkpoint after checkpoint, from a ring of increments.

    Each checkpoint's increment (value minus the previous checkpoint's) goes into row
    ``count % max_lag`` of a (max_lag, n) fp32 ring; one ``torch.mv`` of the ring with it gives
    its dot products with the last max_lag increments, and ``band_from_increment_dots`` turns
    those into every lag: ~1 subtraction + max_lag multiply-adds per element instead of max_lag
    subtractions and reductions. Where the new slice or any of the last max_lag held ones has
    NaN/Inf, the band is computed directly with ``sq_distance_band`` (which skips them).
    Checkpoints read only to prime a resumed task (``need_band=False``) just store their
    increment; the first band needed after them is computed directly and seeds the recursion.
    """

    def __init__(self, ring: torch.Tensor):
        self.ring = ring  # (max_lag, n); rows not yet written hold stale values, never used
        self.max_lag, self.count = ring.shape[0], 0  # count: increments written so far
        self.band = np.full(self.max_lag, np.nan)  # band of the previous checkpoint
        self.finite = False  # the last advance saw only finite values (ring rows finite)

    def advance(
        self, current: torch.Tensor, held: deque, finite: bool, need_band: bool = True
    ) -> np.ndarray | None:
        """Band of ``current`` (lags 1..max_lag; NaN beyond the history in ``held``); None
        when not ``need_band``."""
        if not held:
            return self.band  # first checkpoint read: no history (all NaN)
        slot = self.count % self.max_lag
        torch.sub(current, held[-1][0], out=self.ring[slot])
        self.count += 1
        self.finite = finite and all(ok for _, ok in _last(held, self.max_lag))
        if not need_band:
            self.band = None  # unknown: the next needed band is computed directly
        elif self.finite and self.band is not None:
            dots = torch.mv(self.ring, self.ring[slot]).tolist()
            ordered = [
                dots[(slot - k) % self.max_lag] if k < self.count else math.nan
                for k in range(self.max_lag)
            ]  # ordered[k] = increment_t . increment_{t-k}
            self.band = band_from_increment_dots(self.band, ordered)
        else:
            recent = _last(held, self.max_lag)
            direct = sq_distance_band(current, [b for b, _ in reversed(recent)])
            self.band = np.concatenate([direct, np.full(self.max_lag - len(direct), np.nan)])
        return self.band


class PrecondBand:
    """Preconditioned squared-distance band of a slice: ``sum_i P_i (theta_t,i - theta_t-k,i)^2``
    for k = 1..max_lag, with Adam's ``P = sqrt(v_hat) + eps``, ``v_hat = exp_avg_sq / (1 -
    beta2^step)``, read from the optimizer state saved with checkpoint t: the LATER end of each
    pair (its second moment averages the ~1/(1-beta2) updates just before t, i.e. those the
    pair's displacement is made of; METHODS.md 3b). Fed by the ``_BandTracker``'s increments
    ring: with ``s_k`` the sum of the last k increments (one add per lag), lag k is
    ``dot(s_k, P * s_k)`` (one multiply and one dot): three cheap passes per lag and element,
    one square root per element (measured faster on a CPU than scaling by sqrt(P), which needs
    a second square root, or than the Gram matrix of the P-scaled increments, max_lag^2
    operations per element). Only the slice's rows of ``exp_avg_sq`` are read (memory-mapped
    state, ``optimizer_state.state_rows``); memory: three more slice-sized vectors. Also returns
    ``sum_i P_i`` (for the rounding-noise term in P units). NaN where the state or the history
    is missing."""

    def __init__(self, task: BlockTask, ring: torch.Tensor):
        self.task = task
        self.p = torch.empty(ring.shape[1], dtype=torch.float32)
        self.run = torch.empty(ring.shape[1], dtype=torch.float32, device=ring.device)
        self.weighted = torch.empty_like(self.run)
        self.host = ring.device.type == "cpu"

    def start(self, n_out: int, max_lag: int) -> PrecondBand:
        """Fresh per-slice outputs (per-step arrays over the measured checkpoints)."""
        self.band = np.full((n_out, max_lag), np.nan)
        self.total = np.full(n_out, np.nan)
        return self

    def measure(self, j: int, i: int, start: int, stop: int, band: _BandTracker) -> None:
        """Row ``j`` of the outputs from checkpoint ``i``'s state and the tracker's ring."""
        from pipeline.ingest.optimizer_state import state_rows

        lags, source = band.max_lag, self.task.precond[i]
        if source is None or band.count == 0:
            return
        path, state_id, beta2, eps, updates = source
        n = (stop - start) * self.task.tensor.row_elems
        p = state_rows(path, state_id, "exp_avg_sq", start, stop, out=self.p[:n])
        p = p.mul_(1.0 / (1.0 - beta2**updates)).sqrt_().add_(eps)
        self.total[j] = float(p.sum())
        p = p if self.host else p.to(self.run.device)
        run, weighted = self.run[:n].zero_(), self.weighted[:n]
        for k in range(min(band.count, lags)):
            run.add_(band.ring[(band.count - 1 - k) % lags])
            self.band[j, k] = float(torch.dot(run, torch.mul(run, p, out=weighted)))


def _last(held: deque, k: int) -> list:
    """The last ``k`` entries of ``held`` (all of them when it holds fewer), oldest first."""
    n = len(held)
    return [held[i] for i in range(max(0, n - k), n)]


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


def _sums_finite(flat: torch.Tensor) -> bool:
    """True when the slice's fp32 sum is finite: one pass, no allocation. False for any NaN/Inf
    (and for a finite slice whose sum overflows fp32, which then takes the masked paths: same
    results, only slower)."""
    return math.isfinite(float(flat.sum()))


def _spectral(block: torch.Tensor) -> tuple[float, float]:
    """(spectral entropy, stable rank) of a whole 2-D+ weight (flattened to rows x rest)."""
    from pipeline.estimators.spectral import (
        singular_values_via_gram,
        spectral_metrics,
    )  # optional path

    matrix = block.reshape(block.shape[0], -1)
    return spectral_metrics(singular_values_via_gram(matrix), *matrix.shape)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` on a worker that sees a GPU, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def finalize_layer(blocks: list[dict]) -> dict:
    """Merge the row blocks of one layer into per-step layer statistics (see docs/INTERNALS.md)."""
    total = merge_partials(blocks)
    count = np.where(total["count"] > 0, total["count"], np.nan)
    mean = total["sum"] / count
    var = np.maximum(total["sumsq"] / count - mean**2, 0.0)
    sample = total["sample"]
    entropy = np.array([differential_entropy(torch.from_numpy(row)) for row in sample])
    # the sample back in its storage dtype (exact from fp32): the rounding noise of that dtype
    storage = torch_dtype(blocks[0]["dtype"])
    rounding = np.array([rounding_noise_var(torch.from_numpy(row).to(storage)) for row in sample])
    on_grid = np.array([on_bf16_grid(torch.from_numpy(row)) for row in sample], dtype=np.int8)
    grid_noise = np.array(
        [rounding_noise_var(torch.from_numpy(row).to(torch.bfloat16)) for row in sample]
    )
    gauss = gaussian_entropy(np.where(var > 0, var, np.nan))
    result = {
        "weight_mean": mean,
        "weight_rms": np.sqrt(total["sumsq"] / count),
        "weight_entropy": entropy,
        "gaussian_entropy": gauss,
        "non_gaussianity": gauss - entropy,
        "nonfinite_count": total["nonfinite"],
        "rounding_noise_var": rounding,
        "on_bf16_grid": on_grid,
        "bf16_noise_var": grid_noise,
        "sq_distance": total["sq_distance"],
        "ensemble_log_var": total["ensemble_log_var"],
        "ensemble_frozen": total["ensemble_frozen"],
    }
    for key in ("sq_distance_precond", "precond_sum"):
        if key in total:
            result[key] = total[key]
    if "spectral" in blocks[0]:
        result["spectral_entropy"] = blocks[0]["spectral"][:, 0]
        result["stable_rank"] = blocks[0]["spectral"][:, 1]
    return result
