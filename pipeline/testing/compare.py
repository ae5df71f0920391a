"""Comparing two stores variable by variable (tests, the devices benchmark, the before/after
check of a refactor): one number per variable, the largest difference relative to its scale."""

from __future__ import annotations

import numpy as np
import xarray as xr


def relative_difference(values, reference) -> float:
    """Largest absolute difference between two arrays, divided by the reference's largest finite
    magnitude (dimensionless; 0 = equal). ``inf`` where the shapes or the NaN/Inf entries
    differ; NaN where neither holds a finite value (nothing to compare)."""
    a, b = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape:
        return float("inf")
    finite = np.isfinite(b)
    if not (np.isfinite(a) == finite).all() or not np.array_equal(
        a[~finite], b[~finite], equal_nan=True
    ):
        return float("inf")
    if not finite.any():
        return float("nan")
    diff, scale = np.abs(a[finite] - b[finite]).max(), np.abs(b[finite]).max()
    return 0.0 if diff == 0 else diff / scale if scale > 0 else float("inf")


def largest_differences(tree: xr.DataTree, reference: xr.DataTree) -> dict[str, float]:
    """``relative_difference`` of each numeric variable of each node (key ``node/variable``);
    ``inf`` for a variable missing from ``tree``. Shows that two stores of the same series
    agree, e.g. measured with torch on the CPU and on a GPU."""
    out = {}
    for node in reference.subtree:
        for name, ref in node.dataset.data_vars.items():
            if np.issubdtype(ref.dtype, np.number):
                key = f"{node.path.strip('/') or '/'}/{name}"
                try:
                    out[key] = relative_difference(tree[node.path].dataset[name].values, ref.values)
                except KeyError:
                    out[key] = float("inf")
    return out
