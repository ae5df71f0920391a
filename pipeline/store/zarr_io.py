"""The results store: a Zarr-backed ``xarray.DataTree`` with one node per run (+ ``sweep``).

Writes are atomic: the tree is written to a sibling temporary folder and swapped into place,
so a failed or killed run leaves any previous store byte-identical. Every variable carries
``units``, ``long_name`` and ``estimator`` attrs from ``VARIABLES``, the single registry.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from pathlib import Path

import xarray as xr

from pipeline.core.atomic import process_alive, replace_dir
from pipeline.core.reasons import REASON_TABLES, reason_attrs
from pipeline.store.schema import VARIABLES


def annotate(ds: xr.Dataset) -> xr.Dataset:
    """Set units/long_name/estimator on every data variable from the registry."""
    for name in ds.data_vars:
        if name not in VARIABLES:
            raise KeyError(f"variable {name!r} has no entry in pipeline.store.schema.VARIABLES")
        units, long_name, estimator = VARIABLES[name]
        ds[name].attrs.update(units=units, long_name=long_name, estimator=estimator)
        if name in REASON_TABLES:
            ds[name].attrs.update(reason_attrs(REASON_TABLES[name]))
    return ds


def write_tree(tree: xr.DataTree, path) -> Path:
    """Write ``tree`` to ``path`` atomically (temp folder + rename swap)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with warnings.catch_warnings():  # zarr 3: fixed-width strings, consolidated metadata
            warnings.simplefilter("ignore", UserWarning)
            warnings.filterwarnings(
                "ignore", category=FutureWarning, module=r"zarr\."
            )  # UnstableSpecificationWarning
            tree.to_zarr(tmp, mode="w", consolidated=True, encoding=_encodings(tree))
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _encodings(tree: xr.DataTree) -> dict:
    """One chunk per variable: a store stays a few files whatever its steps x layers."""
    enc = {}
    for node in tree.subtree:
        ds = node.to_dataset(inherit=False)
        enc[node.path] = {
            name: {"chunks": ds[name].shape or None} for name in ds.data_vars if ds[name].ndim
        }
    return {k: v for k, v in enc.items() if v}


def _clean_leftovers(path: Path) -> None:
    """Remove temp folders of killed writers (their pid is gone); restore an old store that a
    writer killed between its two renames left aside."""
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        pid = leftover.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if not (pid.isdigit() and int(pid) != os.getpid() and process_alive(int(pid))):
            shutil.rmtree(leftover, ignore_errors=True)
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    if olds and not path.exists():
        os.replace(olds[-1], path)


def open_tree(path) -> xr.DataTree:
    """Open a store written by ``write_tree`` (lazy, Zarr-backed)."""
    if not Path(path).is_dir():
        from pipeline.core.errors import InputError

        raise InputError(
            path, "no thermoscope store here (run `thermoscope analyze` or `dvc repro` first)"
        )
    return xr.open_datatree(Path(path), engine="zarr")


def node_name(run_name: str) -> str:
    """A DataTree-safe node name for a run (no '/')."""
    return run_name.replace("/", "_") or "run"
