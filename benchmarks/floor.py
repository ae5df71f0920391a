"""The per-core floor of the measure kernel: one process, one torch thread, no Dask, on the row
blocks of a series: the kernel's reads alone, the reads plus the four passes any kernel of the
default band needs (as eager torch and, numba installed, fused into one compiled loop),
``measure_block`` itself (alone and one copy per core at once), and the kernel cost of a
+1-checkpoint rerun in units of one checkpoint's kernel share.

Usage: python benchmarks/floor.py --size 512 --checkpoints 20 [--json]
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import Series, best_of, block_tasks, gb, main, raw_read_rate


def _walk_slices(task, settings, step=None) -> None:
    """The kernel's reads: each cache slice of the block through every checkpoint (into two
    alternating buffers); ``step(current, previous, i)`` then runs on checkpoint i's slice."""
    from pipeline.ingest.safetensors_io import read_rows
    from pipeline.measure.kernel import cpu_slice_rows

    per_slice = cpu_slice_rows(task, settings)
    values = torch.empty((2, _slice_capacity(task, settings)))
    for a in range(task.start, task.stop, per_slice):
        b = min(a + per_slice, task.stop)
        m = (b - a) * task.tensor.row_elems
        for i, f in enumerate(task.files):
            current = read_rows(f, task.tensor.name, a, b, out=values[i % 2, :m])
            if step is not None:
                step(current, values[(i + 1) % 2, :m], i)


def _slice_capacity(task, settings) -> int:
    """Elements of the largest cache slice of ``task`` (as ``measure_block`` cuts them)."""
    from pipeline.measure.kernel import cpu_slice_rows

    return min(cpu_slice_rows(task, settings), task.stop - task.start) * task.tensor.row_elems


def _eager_passes(ring: torch.Tensor):
    """Lower bound of any eager-torch kernel for the default band, as a ``_walk_slices`` step:
    the four unavoidable passes (sum, sum of squares, increment into the (max_lag, n) ``ring``,
    its dot products with the ring rows); no window statistics, no bookkeeping."""

    def step(current, previous, i):
        m = current.numel()
        float(current.sum()), float(torch.dot(current, current))
        increment = ring[i % ring.shape[0], :m]
        torch.sub(current, previous, out=increment)
        torch.mv(ring[:, :m], increment)

    return step


def _fused_step_kernel():
    """The four unavoidable passes fused into one compiled loop (numba, when installed; else
    None): sum, sum of squares, increment into the ring, the increment's dot products with the
    ring rows, in sub-blocks of 2048 elements that stay in L1. A baseline for the floor only:
    what a compiled single-pass kernel would gain over eager torch (the library stays torch)."""
    try:
        from numba import njit
    except ImportError:
        return None

    @njit(fastmath=True, boundscheck=False, cache=False)
    def step(cur, prev, ring, slot, dots):  # pragma: no cover - compiled
        lags, n = ring.shape
        total, total_sq = 0.0, 0.0
        dots[:] = 0.0
        inc = ring[slot]
        for a in range(0, n, 2048):
            b = min(a + 2048, n)
            s, ss = np.float32(0.0), np.float32(0.0)
            for i in range(a, b):
                x = cur[i]
                s += x
                ss += x * x
                inc[i] = x - prev[i]
            total += s
            total_sq += ss
            for k in range(lags):
                row, d = ring[k], np.float32(0.0)
                for i in range(a, b):
                    d += row[i] * inc[i]
                dots[k] += d
        return total, total_sq

    return step


def _fused_passes(kernel, ring: torch.Tensor):
    """``_eager_passes`` as one compiled loop (``kernel`` from ``_fused_step_kernel``)."""
    dots = np.zeros(ring.shape[0])

    def step(current, previous, i):
        m = current.numel()
        kernel(current.numpy(), previous.numpy(), ring[:, :m].numpy(), i % ring.shape[0], dots)

    return step


def floor(root: Path, size_mb, n, dtype="fp32") -> dict:
    """Per-core floor of the measure kernel: one torch thread, no Dask, on the blocks of an
    n-checkpoint series (best of 2 each): the kernel's reads alone, the reads plus the four
    unavoidable passes of the band as eager torch and (numba installed) fused and compiled,
    ``measure_block`` itself, and ``measure_block`` run by one process per core at once; then
    the kernel cost of a +1-checkpoint rerun (``resume_from`` = n: ``max_lag`` priming reads
    and one measured checkpoint) in units of one checkpoint's share of the full kernel. The
    issue's throughput target (0.5x raw on P cores) needs 0.5 x raw / P per core."""
    import dataclasses

    from pipeline.measure.kernel import measure_block
    from pipeline.settings import MeasureSettings

    settings = MeasureSettings()
    s = Series(root / "floor", size_mb, dtype)
    s.extend(n + 1)
    raw = raw_read_rate(s.files[:n])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tasks = block_tasks(s, n, settings)
        grown = [
            dataclasses.replace(
                t, files=t.files + (str(s.files[n]),), steps=t.steps + (100 * n,), resume_from=n
            )
            for t in tasks
        ]
        ring = lambda t: torch.zeros((settings.max_lag, _slice_capacity(t, settings)))  # noqa: E731
        kernels = {
            "read (cache slices)": lambda t: _walk_slices(t, settings),
            "read + sum, sumsq, increment, lag dots": lambda t: _walk_slices(
                t, settings, _eager_passes(ring(t))
            ),
            "measure_block (default metrics)": lambda t: measure_block(t, settings),
        }
        step = _fused_step_kernel()
        if step is not None:  # compile outside the timing
            step(
                *(np.zeros(4, np.float32),) * 2,
                np.zeros((settings.max_lag, 4), np.float32),
                0,
                np.zeros(settings.max_lag),
            )
            kernels["read + the same passes fused (numba)"] = lambda t: _walk_slices(
                t, settings, _fused_passes(step, ring(t))
            )
        seconds = {
            label: best_of(2, lambda k=k: [k(t) for t in tasks]) for label, k in kernels.items()
        }
        rerun = best_of(2, lambda: [measure_block(t, settings) for t in grown])
        cores = os.cpu_count() or 1
        seconds["measure_block, one per core at once"] = _kernel_on_every_core(
            tasks, settings, cores
        )
    finally:
        torch.set_num_threads(before)
    elems = s.n_params * n
    nbytes = sum(f.stat().st_size for f in s.files[:n])
    shutil.rmtree(s.folder)
    rows = {
        label: {
            "seconds": t,
            "ns_per_elem": t / elems * 1e9,
            "bytes_per_s": nbytes / t,
            "ratio": nbytes / t / raw["raw_bytes_per_s"],
        }
        for label, t in seconds.items()
    }
    return {
        "size_mb": size_mb,
        "checkpoints": n,
        "dtype": dtype,
        "n_params": s.n_params,
        "cores": cores,
        "raw_bytes_per_s": raw["raw_bytes_per_s"],
        "kernels": rows,
        "needed_per_core_ratio": 0.5 / cores,
        "rerun_kernel_s": rerun,
        "rerun_over_share": rerun / (seconds["measure_block (default metrics)"] / n),
    }


def _kernel_seconds(tasks, settings) -> float:
    """Wall time (s) of ``measure_block`` over ``tasks`` in this process, one torch thread."""
    from pipeline.measure.kernel import measure_block

    torch.set_num_threads(1)
    return best_of(1, lambda: [measure_block(t, settings) for t in tasks])


def _kernel_on_every_core(tasks, settings, cores: int) -> float:
    """Mean wall time (s) of the same kernel run by ``cores`` forked processes at once: what
    each core keeps of its one-core speed when all share the caches and the memory bus."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("fork")) as pool:
        return float(np.mean(list(pool.map(_kernel_seconds, [tasks] * cores, [settings] * cores))))


def format_floor(r: dict) -> str:
    lines = [
        f"\nfloor (one torch thread per process, no Dask): {r['checkpoints']} x {r['size_mb']} MB "
        f"{r['dtype']} ({r['n_params']:,} params), raw read {gb(r['raw_bytes_per_s'])} GB/s",
        f"  {'kernel':40s} {'ns/elem':>8s} {'GB/s':>6s} {'x raw':>6s}",
    ]
    for label, x in r["kernels"].items():
        lines.append(
            f"  {label:40s} {x['ns_per_elem']:8.2f} {gb(x['bytes_per_s']):>6s} {x['ratio']:6.2f}"
        )
    lines.append(
        f"  needed per core for 0.5x raw on {r['cores']} cores: {r['needed_per_core_ratio']:.2f}"
        f" x raw = {gb(r['needed_per_core_ratio'] * r['raw_bytes_per_s'])} GB/s"
    )
    lines.append(
        f"  +1 checkpoint (resume at {r['checkpoints']}: priming reads + 1 measured): "
        f"{r['rerun_kernel_s']:.2f} s = {r['rerun_over_share']:.2f}x a checkpoint's kernel share"
    )
    return "\n".join(lines)


MODES = {
    "floor": (lambda root, a: floor(root, a.size, a.checkpoints, a.dtype), format_floor),
}

if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], MODES, setup=lambda p: p.set_defaults(no_startup=True)))
