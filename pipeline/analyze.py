"""The Python API: ``analyze`` does index -> measure -> thermo -> store in one call (what
``thermoscope analyze`` runs); the stages do the same steps one DVC stage at a time."""

from __future__ import annotations

import importlib
import threading
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
    # xarray, zarr and the thermo code (torch via the estimators) are not needed to reach the
    # first task: imported beside the measurement once its first layer is in (this process
    # then mostly waits on the workers; earlier, the imports would delay the first task)
    importing = threading.Thread(target=_import_derive_modules, name="import-thermo", daemon=True)

    def progress_and_import(what: str, done: int, total: int) -> None:
        if done and importing.ident is None:  # not started yet
            importing.start()
        if progress:
            progress(what, done, total)

    results = measure_manifest(manifest, measure, cluster, cache_dir, progress_and_import)
    if importing.ident is not None:
        importing.join()
    from pipeline.measure.dataset import measured_tree
    from pipeline.store.zarr_io import write_tree
    from pipeline.thermo.derive import derive

    tree = derive(measured_tree(manifest, results, measure), thermo_settings(thermo_params))
    return write_tree(tree, store)


DERIVE_MODULES = ("pipeline.measure.dataset", "pipeline.store.zarr_io", "pipeline.thermo.derive")


def _import_derive_modules() -> None:
    """Import what turns measurements into the store (an import error surfaces at the import
    after the measurement, with its traceback)."""
    for name in DERIVE_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - re-raised by the import in analyze()
            return
