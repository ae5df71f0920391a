"""The store module: registry attrs, atomic writes, recovery from killed writers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from pipeline.store.schema import VARIABLES
from pipeline.store.zarr_io import open_tree, write_tree
from pipeline.testing.compare import largest_differences


def _tree(value: float) -> xr.DataTree:
    ds = xr.Dataset(
        {"weight_rms": (("step", "layer"), np.full((3, 2), value))},
        coords={"step": [0, 10, 20], "layer": ["a", "b"]},
    )
    ds.weight_rms.attrs.update(units="weight", long_name="rms")
    return xr.DataTree.from_dict({"/": xr.Dataset(attrs={"source": "x"}), "/run": ds})


def test_write_replaces_atomically_and_cleans_dead_writers_leftovers(tmp_path):
    store = tmp_path / "s.zarr"
    write_tree(_tree(1.0), store)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    leftover = tmp_path / f".s.zarr.tmp-{dead.stdout.strip()}-deadbeef"
    leftover.mkdir()
    (leftover / "junk").write_text("half-written")
    write_tree(_tree(2.0), store)
    assert not leftover.exists()
    assert float(open_tree(store)["run"].weight_rms.mean()) == 2.0


def test_old_store_left_aside_by_a_killed_swap_is_restored(tmp_path):
    store = tmp_path / "s.zarr"
    write_tree(_tree(1.0), store)
    aside = tmp_path / ".s.zarr.old-12345678"
    store.rename(aside)  # a writer killed between its two renames
    write_tree(_tree(3.0), tmp_path / "other.zarr")  # unrelated store: nothing happens here
    assert not store.exists()
    write_tree(_tree(2.0), store)
    assert float(open_tree(store)["run"].weight_rms.mean()) == 2.0
    assert not aside.exists()


def test_every_registered_variable_has_units_and_long_name():
    for name, (units, long_name, estimator) in VARIABLES.items():
        assert units and long_name and estimator, name


def test_missing_store_is_a_clear_error(tmp_path):
    from pipeline.core.errors import InputError

    with pytest.raises(InputError, match="no thermoscope store"):
        open_tree(tmp_path / "nothing.zarr")


def test_largest_differences_are_relative_to_the_reference_scale():
    ref = _tree(2.0)
    same = largest_differences(_tree(2.0), ref)
    assert same == {"run/weight_rms": 0.0}
    shifted = ref.copy(deep=True)
    shifted["run"].dataset.weight_rms[1, 0] = 2.0 + 2e-6  # one entry off by 1e-6 of the scale
    assert largest_differences(shifted, ref)["run/weight_rms"] == pytest.approx(1e-6, rel=1e-6)
    holed = ref.copy(deep=True)
    holed["run"].dataset.weight_rms[0, 1] = np.nan  # NaN where the reference is finite
    assert largest_differences(holed, ref)["run/weight_rms"] == float("inf")
    empty = ref.copy(deep=True)
    empty["run"].dataset.weight_rms[:] = np.nan
    assert np.isnan(largest_differences(empty, empty)["run/weight_rms"])  # nothing to compare
    missing = xr.DataTree.from_dict({"/": xr.Dataset(), "/run": xr.Dataset()})
    assert largest_differences(missing, ref)["run/weight_rms"] == float("inf")
