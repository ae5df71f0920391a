"""The four DVC stages as functions of the settings (stages/*.py call these).

Each stage imports what it needs inside its body, so the light stages (index, report) load
neither torch nor Dask; ``tests/test_stage_deps.py`` checks that dvc.yaml lists every module a
stage imports.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.core.atomic import write_text
from pipeline.core.errors import ThermoscopeError
from pipeline.settings import Settings, load_settings


def index(settings: Settings) -> None:
    """Scan checkpoints.dir (generating the demo first when it points at demo.dir)."""
    from pipeline.ingest.discovery import discover
    from pipeline.ingest.remote import is_url
    from pipeline.ingest.selection import select

    ck = settings.checkpoints
    source = ck.dir  # a folder or a URL (s3://, https://, hf://, ...): not a Path
    if not is_url(source) and Path(source).resolve() == Path(settings.demo.dir).resolve():
        from pipeline.demo import make_demo

        make_demo(source)
    manifest = discover(source, ck.skip_bad, ck.base_model, ck.lora_raw)
    manifest = select(manifest, ck.steps, ck.layers)
    write_text(Path(settings.paths.manifest), manifest.to_json())


def measure(settings: Settings) -> None:
    """Stream every layer through its checkpoints on the Dask cluster -> measured store."""
    from pipeline.measure import forkserver

    forkserver.start_early(settings.dask)  # workers' imports beside this process's
    from pipeline.core.manifest import Manifest
    from pipeline.core.progress import progress_printer
    from pipeline.measure.dataset import measured_tree
    from pipeline.measure.graph import measure_manifest
    from pipeline.store.zarr_io import write_tree

    paths = settings.paths
    manifest = Manifest.from_json(Path(paths.manifest).read_text())
    results = measure_manifest(
        manifest, settings.measure, settings.dask, paths.cache, progress_printer()
    )
    write_tree(measured_tree(manifest, results, settings.measure), paths.measured)


def thermo(settings: Settings) -> None:
    """Derive temperatures, entropies, first law, efficiencies, equilibrium (no checkpoint I/O)."""
    from pipeline.store.zarr_io import open_tree, write_tree
    from pipeline.thermo.derive import derive

    measured = open_tree(settings.paths.measured).load()
    write_tree(derive(measured, settings.thermo), settings.paths.store)


def report(settings: Settings) -> None:
    """Figures, the HTML page, DVC metrics and plots."""
    from pipeline.report import render_report

    render_report(settings.paths.store, settings.paths.report)


def run_stage(stage) -> None:
    """Entry point for stages/*.py: one-line error and exit 2 on bad input."""
    try:
        stage(load_settings(os.environ.get("THERMOSCOPE_PARAMS", "params.yaml")))
    except ThermoscopeError as exc:
        print(f"thermoscope {stage.__name__}: error: {exc}", file=sys.stderr)
        sys.exit(2)
