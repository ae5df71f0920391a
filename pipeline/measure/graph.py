"""The measurement of a whole manifest: cached layers reused, the rest as Dask tasks.

``measure_manifest`` loads what the layer cache already holds, builds one task per (run,
layer, row block) for the checkpoints not yet measured, runs them on the cluster
(``parallel``) and returns every layer's merged result, saving each to the cache as it lands.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.core.manifest import ADAM_KINDS, Manifest, Run
from pipeline.measure.cache import LayerCache, merge
from pipeline.measure.parallel import check_device, dashboard_link, dask_client, run_tasks
from pipeline.measure.tasks import BlockTask, layer_blocks
from pipeline.settings import ClusterSettings, MeasureSettings

Progress = Callable[[str, int, int], None]  # (what, done, total)


def _block_tasks(run: Run, settings: MeasureSettings, resume_from: dict[str, int]) -> dict:
    layers = {}
    steps = tuple(run.steps)
    for tensor in run.tensors:
        if resume_from[tensor.name] >= len(steps):
            continue
        files = tuple(c.files[tensor.name] for c in run.checkpoints)
        precond = precond_sources(run, tensor.name)
        layers[(run.name, tensor.name)] = [
            BlockTask(run.name, tensor, a, b, files, steps, resume_from[tensor.name], precond)
            for a, b in layer_blocks(tensor, settings)
        ]
    return layers


def precond_sources(run: Run, name: str) -> tuple:
    """Per checkpoint (state file, state id, beta2, eps, update count) of tensor ``name`` for
    an Adam-family run with a verified mapping (None where a checkpoint lacks state); ()
    otherwise."""
    opt = run.optimizer
    if opt.get("kind") not in ADAM_KINDS or name not in opt.get("mapping", {}):
        return ()
    group = opt["group"][name]
    out = []
    for c in run.checkpoints:
        state = c.optimizer
        if not state or not state.get("step"):
            out.append(None)
            continue
        g = state["groups"][group]
        out.append((state["file"], opt["mapping"][name], g["beta2"], g["eps"], state["step"]))
    return tuple(out)


def measure_manifest(
    manifest: Manifest,
    settings: MeasureSettings,
    cluster: ClusterSettings,
    cache_dir,
    progress: Progress | None = None,
) -> dict[str, dict[str, dict]]:
    """{run: {tensor: layer result}} for every run and tensor, measuring only what is new."""
    cache = LayerCache(cache_dir, settings)
    runs = {run.name: run for run in manifest.runs}
    cached, todo = {}, {}
    for run in manifest.runs:
        starts = {}
        for tensor in run.tensors:
            cached[(run.name, tensor.name)], starts[tensor.name] = cache.load(run, tensor)
        todo.update(_block_tasks(run, settings, starts))
    results = {k: v for k, v in cached.items() if k not in todo}
    if todo:
        check_device(settings.device, cluster)
        with dask_client(cluster) as client:
            if progress and dashboard_link(client):
                progress(f"dask dashboard: {dashboard_link(client)}", 0, len(todo))
            for done, ((run_name, name), new) in enumerate(run_tasks(client, todo, settings), 1):
                results[(run_name, name)] = merge(cached[(run_name, name)], new)
                cache.save(
                    runs[run_name], todo[(run_name, name)][0].tensor, results[(run_name, name)]
                )
                if progress:
                    progress(f"{run_name}: {name}", done, len(todo))
    out: dict[str, dict[str, dict]] = {}
    for run in manifest.runs:
        out[run.name] = {t.name: results[(run.name, t.name)] for t in run.tensors}
    return out
