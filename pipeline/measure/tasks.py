"""The measure stage's unit of work, without torch: a (run, layer, row block) task and the row
blocks of a layer. The main process builds and submits tasks from here, so it reaches the
first task without importing torch (~1.5 s here); the workers import ``kernel``, which runs
them."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.manifest import TensorInfo
from pipeline.settings import MeasureSettings


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
    # Adam preconditioner source per checkpoint: (state file, state id, beta2, eps, update
    # count), None where missing; empty for runs without Adam state (``PrecondBand``)
    precond: tuple = ()

    def read_from(self, settings: MeasureSettings) -> int:
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
