"""The Python API: ``analyze`` does index -> measure -> thermo -> store in one call (what
``thermoscope analyze`` runs); the stages do the same steps one DVC stage at a time."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.manifest import Manifest
from pipeline.ingest.discovery import discover
from pipeline.measure.dataset import measured_tree
from pipeline.measure.graph import Progress, measure_manifest
from pipeline.settings import ClusterSettings, MeasureSettings, ThermoSettings, thermo_settings
from pipeline.store.zarr_io import write_tree


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
) -> Path:
    """Index, measure and derive the thermodynamics of the checkpoints under ``path``
    (``manifest``: the result of ``discover(path, skip_bad, ...)`` when the caller already has
    it). ``base_model`` / ``lora_raw``: for a LoRA adapter series (see ``discover``)."""
    from pipeline.thermo.derive import derive  # thermo depends on the measured schema built here

    measure, cluster = measure or MeasureSettings(), cluster or ClusterSettings()
    manifest = manifest or discover(path, skip_bad, base_model, lora_raw)
    cache_dir = cache_dir or Path(store).with_name(f".{Path(store).name}.cache")
    results = measure_manifest(manifest, measure, cluster, cache_dir, progress)
    tree = derive(measured_tree(manifest, results, measure), thermo_settings(thermo_params))
    return write_tree(tree, store)
