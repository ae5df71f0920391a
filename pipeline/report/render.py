"""The report stage: one self-contained HTML page, DVC metrics (JSON) and plot tables (CSV).

``render_report(store_path, out_dir)`` reads the store written by the analysis (schema in
``pipeline/store/schema.py``) and writes, atomically (everything goes to a temporary folder
first, then ``os.replace``):

- ``index.html``: the sections of ``sections.build_sections`` (summary, temperature and
  entropy maps, global curves, efficiencies, work/heat, sweep power law, free energy, a
  sortable per-layer table, non-finite counts, skipped files); see ``html.render_html``.
- ``metrics.json`` and ``plots/*.csv``: see ``metrics``.

Reading the store: ``data``; figures: ``figures``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import xarray as xr

from pipeline.report.data import open_store, split_tree
from pipeline.report.html import render_html
from pipeline.report.metrics import compute_metrics, plot_tables
from pipeline.report.sections import build_sections

TITLE = "thermoscope report"


def write_outputs(tree: xr.DataTree, store_path: Path, folder: Path) -> None:
    """Compute everything from the tree; write index.html, metrics.json and plots/ in ``folder``."""
    attrs, runs, sweep = split_tree(tree, store_path)
    plots = folder / "plots"
    plots.mkdir()
    for name, df in plot_tables(runs, sweep).items():
        df.to_csv(plots / name, index=False)
    (folder / "metrics.json").write_text(
        json.dumps(compute_metrics(runs, sweep), indent=2, sort_keys=True)
    )
    page = render_html(build_sections(attrs, runs, sweep), TITLE)
    (folder / "index.html").write_text(page, encoding="utf-8")


def install(tmp: Path, out_dir: Path) -> None:
    """Move the finished files into ``out_dir`` with ``os.replace`` (index.html last).

    Plot tables the new report does not have (a run that is gone) are deleted.
    """
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    new_plots = {p.name for p in (tmp / "plots").iterdir()}
    for name in sorted(new_plots):
        os.replace(tmp / "plots" / name, out_dir / "plots" / name)
    for old in (out_dir / "plots").iterdir():
        if old.is_file() and old.suffix in (".csv", ".json") and old.name not in new_plots:
            old.unlink()
    os.replace(tmp / "metrics.json", out_dir / "metrics.json")
    os.replace(tmp / "index.html", out_dir / "index.html")


def render_report(store_path, out_dir) -> Path:
    """Render the report of the store at ``store_path`` into ``out_dir``; returns its index.html.

    All files are produced in a temporary folder beside ``out_dir`` and only then moved into
    place, so a failure while reading the store or drawing leaves an old report untouched.
    """
    store_path, out_dir = Path(store_path), Path(out_dir)
    tree = open_store(store_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write_outputs(tree, store_path, tmp)
        install(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        tree.close()
    return out_dir / "index.html"
