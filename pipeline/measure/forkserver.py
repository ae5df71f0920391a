"""Worker processes that start without importing torch again: one multiprocessing forkserver.

A local Dask cluster of worker processes normally spawns each worker, and each then imports
numpy, torch and distributed (~3 s here, and the main process has just done the same).
``start`` launches one forkserver that imports them once, in the worker environment (one
OpenMP/BLAS thread per worker process, the glibc malloc settings; ``WORKER_ENV``); ``parallel`` then
has Dask's nannies fork their workers from it (``distributed.worker.multiprocessing-method:
forkserver``), which takes ~0.1 s each. Started early (before the main process imports torch
and xarray) the server's imports run on the otherwise idle second core; it lives until this
process exits and serves every later cluster (tests start many). Light: stdlib only.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.settings import ClusterSettings

PRELOAD = ["numpy", "torch", "distributed", "pipeline.measure.kernel"]

# glibc malloc in the worker processes: Dask's default MALLOC_TRIM_THRESHOLD_ (64 KiB) returns
# freed memory at once and, being set, turns off glibc's adaptive mmap threshold, so every
# temporary above 128 KiB (MKL's packing buffers, a slice's scratch) is a fresh mmap that is
# page-faulted in again: ~40% of a measure task's time. Worker memory is bounded by design
# (a task holds ~ (2 max_lag + 2) slices), so keep freed memory up to 64 MiB for reuse.
WORKER_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(64 << 20), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
# What the worker environment must hold before the interpreter starts, i.e. in the server's:
# the malloc settings, one OpenMP/BLAS thread per worker process (parallelism is across tasks)
# and Dask's fixed hash seed (consistent hashing across workers), as Dask sets for spawned ones.
# ``parallel`` also passes them as Dask's pre-spawn environment, so a worker's os.environ
# reports the values it runs with.
WORKER_ENV = {
    **WORKER_MALLOC,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "PYTHONHASHSEED": "6640",
}

_started = False


def start() -> None:
    """Launch the forkserver with ``PRELOAD`` imported and the worker environment (no-op when
    already started). Returns at once: the imports run in the server."""
    global _started
    if _started:
        return
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(
        WORKER_ENV
    )  # the server (and so every worker) starts with these; this process keeps its own
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _started = True


def start_early(cluster: ClusterSettings) -> None:
    """``start`` when this run will fork local worker processes (not for thread workers, nor
    when joining a scheduler): ``ClusterSettings.forks_local_workers``. Light: the settings
    need neither torch nor Dask imported."""
    if cluster.forks_local_workers:
        start()
