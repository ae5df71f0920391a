"""Where measurement tasks run: an embedded local Dask cluster, an existing one, or GPU workers.

``dask_client`` yields a ``distributed.Client``: joins ``scheduler_address`` (or the
``DASK_SCHEDULER_ADDRESS`` environment variable) when given, else starts a ``LocalCUDACluster``
(one worker per GPU, dask-cuda) when CUDA is visible and allowed, else a ``LocalCluster`` of
single-threaded worker processes sized to the machine, forked from a server that has imported
torch (``forkserver``), or of threads of this process. ``run_tasks`` submits a
(run, layer) -> [blocks] -> finalize graph and yields each layer as it completes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import dask
from distributed import Client, LocalCluster, as_completed

from pipeline.core.errors import InputError
from pipeline.measure import forkserver, resident
from pipeline.measure.tasks import BlockTask
from pipeline.settings import ClusterSettings, MeasureSettings


def check_device(device: str, settings: ClusterSettings) -> None:
    """Fail before any work, with a clear line, when ``measure.device`` names CUDA and the local
    cluster would have none (the workers of an existing cluster may: not checked there)."""
    if device.startswith("cuda") and not settings.address and not forkserver.cuda_visible():
        raise InputError(
            "params.yaml",
            f"measure.device is '{device}' but no CUDA device is visible here "
            "(use 'auto' or 'cpu')",
        )


@contextlib.contextmanager
def dask_client(settings: ClusterSettings) -> Iterator[Client]:
    """A connected client; a cluster started here is closed on exit."""
    address = settings.address
    if address:
        with Client(address) as client:
            yield client
        return
    joined = resident.client(settings) if resident.uses_resident(settings) else None
    if joined is not None:
        with joined:
            yield joined
        return
    with (
        local_cluster(settings) as cluster,
        _one_thread_per_task(settings),
        Client(cluster) as client,
    ):
        yield client


@contextlib.contextmanager
def _one_thread_per_task(settings: ClusterSettings) -> Iterator[None]:
    """Thread workers share this process's torch and BLAS: one intra-op thread per task while
    they run, as worker processes have (else each concurrent task starts an OpenMP or OpenBLAS
    team of all cores, e.g. numpy's ``syrk`` of a spectrum, and the cores are
    oversubscribed)."""
    if settings.processes:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def local_cluster(settings: ClusterSettings, security=None):
    """The local cluster ``settings`` describe (for this run, or resident: ``resident.serve``,
    with a ``distributed.Security`` that makes every connection TLS with its certificate)."""
    quiet = {"silence_logs": logging.ERROR, "dashboard_address": ":0", "security": security}
    if settings.gpu != "off" and forkserver.cuda_visible():
        try:
            from dask_cuda import LocalCUDACluster  # extra `gpu`
        except (
            ImportError
        ):  # workers below still use the GPU (measure.device: auto), one context each
            logging.getLogger(__name__).warning(
                "CUDA is visible but dask-cuda is not installed "
                "(pip install thermoscope[gpu]): CPU-style workers share the GPU"
            )
        else:
            return LocalCUDACluster(memory_limit=settings.memory_limit, **quiet)
    n = settings.n_workers or os.cpu_count() or 1
    config, environ = {}, contextlib.nullcontext()
    if settings.processes:  # fork the workers from the preloaded server (pipeline/forkserver.py)
        forkserver.start()  # no-op while the server it started (early, by the caller) runs
        config = {
            f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in forkserver.WORKER_ENV.items()
        }
        config["distributed.worker.multiprocessing-method"] = "forkserver"
        environ = forkserver.worker_environ()  # the nannies start (and fork) inside the block
    with dask.config.set(config), environ:
        return LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=settings.processes,
            memory_limit=settings.memory_limit,
            **quiet,
        )


def run_tasks(
    client: Client, layers: dict[tuple[str, str], list[BlockTask]], settings: MeasureSettings
) -> Iterator[tuple[tuple[str, str], dict]]:
    """Submit every layer's block tasks and a finalize task; yield (key, result) as done."""
    finals = {}
    for key, tasks in layers.items():
        blocks = [client.submit(_measure_block, t, settings, pure=False) for t in tasks]
        finals[client.submit(_finalize_layer, blocks, pure=False)] = key
    for future in as_completed(finals):
        key = finals.pop(future)
        result = future.result()
        future.release()
        yield key, result


def _measure_block(task: BlockTask, settings: MeasureSettings) -> dict:
    """``kernel.measure_block``, imported where the task runs (a worker: preloaded there), so
    this process submits the first task without importing torch."""
    from pipeline.measure.kernel import measure_block

    return measure_block(task, settings)


def _finalize_layer(blocks: list[dict]) -> dict:
    """``kernel.finalize_layer``, imported where it runs (see ``_measure_block``)."""
    from pipeline.measure.kernel import finalize_layer

    return finalize_layer(blocks)


def dashboard_link(client: Client) -> str | None:
    with contextlib.suppress(Exception):
        return client.dashboard_link
    return None
