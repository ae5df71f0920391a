"""Worker processes that start without importing torch again: one multiprocessing forkserver.

A local Dask cluster of worker processes normally spawns each worker, and each then imports
numpy, torch and distributed (~3 s here, and the main process has just done the same).
``start`` launches one forkserver that imports them once, in the worker environment (one
OpenMP/BLAS thread per worker process, the glibc malloc settings; ``WORKER_ENV``); ``parallel`` then
has Dask's nannies fork their workers from it (``distributed.worker.multiprocessing-method:
forkserver``), which takes ~0.1 s each. Started early (before the main process imports torch
and xarray) the server's imports run on the otherwise idle second core; it lives until this
process exits and serves every later cluster (tests start many); ``start`` before each makes
sure the running server is that one. ``worker_environ`` holds the worker environment in this
process while a cluster starts, so neither an earlier cluster's leftovers nor ours leak across
(Dask's nanny reads and writes ``os.environ``). Light: stdlib only.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import sys
from collections.abc import Iterator
from pathlib import Path
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

_server_pid: int | None = None  # the server ``start`` launched (None: none yet)


@contextlib.contextmanager
def worker_environ() -> Iterator[None]:
    """``WORKER_ENV`` in this process's ``os.environ`` for the block, its own values after.

    What starts a worker (the server's launch, a Dask nanny) reads the environment here, and
    Dask's nanny prefers ``os.environ`` over its ``pre-spawn-environ`` config and writes the
    result back into ``os.environ``: without this, a value left by an earlier cluster (Dask's
    default ``MALLOC_TRIM_THRESHOLD_=65536``) would win, and ours would leak into this process
    (``OMP_NUM_THREADS=1`` for every later subprocess)."""
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start() -> None:
    """Launch the forkserver with ``PRELOAD`` imported and the worker environment. Returns at
    once: the imports run in the server. A no-op while the server it launched runs; one that
    died is launched again, and one that someone else launched first (a pool, a DataLoader),
    which has neither, is replaced when it serves no process (``_replace_foreign``)."""
    global _server_pid
    server = multiprocessing.forkserver._forkserver  # the one every forkserver context uses
    running = server._forkserver_pid
    if running is not None and running != _server_pid and not _replace_foreign(server, running):
        return
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    with worker_environ():
        server.ensure_running()  # no-op while ours runs; relaunches it if it died
    _server_pid = server._forkserver_pid


def _replace_foreign(server: multiprocessing.forkserver.ForkServer, pid: int) -> bool:
    """Stop a forkserver that this module did not launch when no process it forked is alive
    (their exit status would be lost with it), so ``start`` launches ours; else keep it, with
    a warning: workers then import torch themselves and run with Dask's defaults."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = ["unknown"]
    if children:
        logging.getLogger(__name__).warning(
            "a multiprocessing forkserver started elsewhere serves live processes: workers "
            "fork from it without thermoscope's preload and worker environment"
        )
        return False
    server._stop()
    return True


def start_early(cluster: ClusterSettings) -> None:
    """As early as possible in a run: launch the resident cluster it will join
    (``resident.launch``, when keep-alive is on) or ``start`` the server it will fork local
    worker processes from (not for thread workers, nor when joining a scheduler:
    ``ClusterSettings.forks_local_workers``). Light: neither torch nor Dask imported."""
    from pipeline.measure import resident

    if resident.uses_resident(cluster):
        resident.launch(cluster)
    elif cluster.forks_local_workers:
        start()


def cuda_visible() -> bool:
    """``torch.cuda.is_available()``, without importing torch on a Linux machine that has no
    NVIDIA device node (no driver: CUDA cannot be available there)."""
    if sys.platform.startswith("linux") and not os.path.exists("/dev/nvidiactl"):
        return False
    import torch

    return torch.cuda.is_available()
