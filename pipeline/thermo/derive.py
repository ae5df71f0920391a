"""The thermo stage's entry: measured tree -> derived tree (every run node, plus ``sweep``)."""

from __future__ import annotations

import xarray as xr

from pipeline.settings import ThermoSettings, thermo_settings
from pipeline.thermo.run import derive_run
from pipeline.thermo.sweep import sweep_dataset


def derive(tree: xr.DataTree, settings: ThermoSettings | dict | None = None) -> xr.DataTree:
    """Measured tree -> tree with derived variables on every run node (+ ``sweep`` node)."""
    settings = thermo_settings(settings)
    nodes = {"/": tree.to_dataset(inherit=False)}
    runs = {
        name: derive_run(child.to_dataset(inherit=False), settings)
        for name, child in tree.children.items()
        if name != "sweep"
    }
    nodes.update({f"/{name}": ds for name, ds in runs.items()})
    if len(runs) >= 2:
        nodes["/sweep"] = sweep_dataset(runs, settings.stationarity_rel_tol)
    return xr.DataTree.from_dict(nodes)
