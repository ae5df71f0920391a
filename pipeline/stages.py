"""The four DVC stages as functions of params.yaml (stages/*.py call these)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import forkserver
from .atomic import write_text
from .errors import ThermoscopeError
from .manifest import Manifest
from .params import cluster_settings, load_params, measure_settings


def index(params: dict) -> None:
    """Scan checkpoints.dir (generating the demo first when it points at demo.dir)."""
    from .discovery import discover

    source = Path(params["checkpoints"]["dir"])
    if source.resolve() == Path(params["demo"]["dir"]).resolve():
        from .demo import make_demo

        make_demo(source)
    manifest = discover(source, skip_bad=bool(params["checkpoints"].get("skip_bad")))
    write_text(Path(params["paths"]["manifest"]), manifest.to_json())


def measure(params: dict) -> None:
    """Stream every layer through its checkpoints on the Dask cluster -> measured store."""
    forkserver.start_early(params.get("dask") or {})  # workers' imports beside this process's
    from .analyze import measure_manifest, measured_tree
    from .progress import progress_printer
    from .store import write_tree

    manifest = Manifest.from_json(Path(params["paths"]["manifest"]).read_text())
    settings = measure_settings(params)
    results = measure_manifest(manifest, settings, cluster_settings(params),
                               params["paths"]["cache"], progress_printer())
    write_tree(measured_tree(manifest, results, settings), params["paths"]["measured"])


def thermo(params: dict) -> None:
    """Derive temperatures, entropies, first law, efficiencies, equilibrium (no checkpoint I/O)."""
    from .store import open_tree, write_tree
    from .thermo import derive

    measured = open_tree(params["paths"]["measured"]).load()
    write_tree(derive(measured, params.get("thermo") or {}), params["paths"]["store"])


def report(params: dict) -> None:
    """Figures, the HTML page, DVC metrics and plots."""
    from .report import render_report

    render_report(params["paths"]["store"], params["paths"]["report"])


def run_stage(stage) -> None:
    """Entry point for stages/*.py: one-line error and exit 2 on bad input."""
    try:
        stage(load_params(os.environ.get("THERMOSCOPE_PARAMS", "params.yaml")))
    except ThermoscopeError as exc:
        print(f"thermoscope {stage.__name__}: error: {exc}", file=sys.stderr)
        sys.exit(2)
