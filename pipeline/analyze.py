"""The Python API: ``analyze`` does index -> measure -> thermo -> store in one call (what
``thermoscope analyze`` runs); the stages do the same steps one DVC stage at a time."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.manifest import Manifest
from pipeline.ingest.discovery import discover
from pipeline.ingest.selection import select
from pipeline.measure.graph import Progress, measure_manifest
from pipeline.settings import ClusterSettings, MeasureSettings, ThermoSettings, thermo_settings


def analyze(
    path,
    store,
    measure: MeasureSettings | None = None,
    cluster: ClusterSettings | None = None,
    thermo_params: ThermoSettings | dict | None = None,
    skip_bad: bool = False,
    base_model=None,
    lora_raw: bool = False,
    cache_dir=None,
    progress: Progress | None = None,
    manifest: Manifest | None = None,
    steps: str | None = None,
    layers: str | None = None,
) -> Path:
    """Index, measure and derive the thermodynamics of the checkpoints under ``path``
    (``manifest``: the result of ``discover(path, skip_bad, ...)`` when the caller already has
    it; ``steps``/``layers`` then do not apply). ``base_model`` / ``lora_raw``: for a LoRA
    adapter series (see ``discover``). ``steps`` / ``layers``: the checkpoints and layers to
    analyse (``ingest.selection``: "100:2000", "::5"; globs or "re:<regex>"). ``path`` may be
    a URL (s3://, gs://, https://, hf://)."""

    measure, cluster = measure or MeasureSettings(), cluster or ClusterSettings()
    if manifest is None:
        manifest = select(discover(path, skip_bad, base_model, lora_raw), steps, layers)
    cache_dir = cache_dir or Path(store).with_name(f".{Path(store).name}.cache")
    results = measure_manifest(manifest, measure, cluster, cache_dir, progress)
    # imported once measured: xarray, zarr and the thermo code (torch via the estimators) are
    # not needed to reach the first task, and a run that fails early never loads them
    from pipeline.measure.dataset import measured_tree
    from pipeline.store.zarr_io import write_tree
    from pipeline.thermo.derive import derive

    tree = derive(measured_tree(manifest, results, measure), thermo_settings(thermo_params))
    return write_tree(tree, store)
