"""bf16: whether a rounding correction applies is detected from the series and recorded.

fp32 files whose values all lie on the bf16 grid are pure-bf16 training exported losslessly
(nothing to subtract); bf16 files carry the export rounding of fp32 master weights (subtracted);
ordinary fp32 files carry fp32 rounding. Real safetensors series, measured by the pipeline.
"""

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import load_file, save_file

from pipeline.analyze import analyze
from pipeline.estimators.displacement import on_bf16_grid
from pipeline.settings import ClusterSettings, MeasureSettings
from pipeline.testing.simulate import LayerSpec, simulate_quadratic_series
from pipeline.thermo.temperature import rounding_correction

SETTINGS = MeasureSettings(max_lag=8, entropy_sample=4096, ensemble_window=8)


def test_on_bf16_grid():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    assert not on_bf16_grid(x)
    assert on_bf16_grid(x.bfloat16().float())
    assert on_bf16_grid(torch.tensor([1.0, float("nan"), 0.5]))  # non-finite values ignored
    assert not on_bf16_grid(torch.tensor([float("nan")]))  # nothing to decide on


def _measured(dtypes, on_grid, storage, grid):
    n = len(dtypes)
    return xr.Dataset(
        {
            "rounding_noise_var": (("step", "layer"), np.tile(storage, (3, 1))),
            "bf16_noise_var": (("step", "layer"), np.tile(grid, (3, 1))),
            "on_bf16_grid": (("step", "layer"), np.tile(on_grid, (3, 1)).astype(float)),
        },
        coords={"storage_dtype": ("layer", dtypes), "layer": [f"l{j}" for j in range(n)]},
    )


def test_rounding_correction_rules():
    ds = _measured(["F32", "F32", "BF16"], [1, 0, 1], [1e-15, 1e-15, 1e-6], [1e-6, 1e-6, 1e-6])
    sub, res, labels = rounding_correction(ds, "auto")
    np.testing.assert_array_equal(sub, [0.0, 1e-15, 1e-6])
    np.testing.assert_array_equal(res, [1e-6, 1e-15, 1e-6])  # pure bf16: the bf16 grid limits
    assert labels[0] == "none (pure-bf16 training exported to F32)"
    assert labels[1] == "F32 storage rounding subtracted"
    assert labels[2].startswith("bf16 export rounding subtracted")
    sub, _, labels = rounding_correction(ds, "none")
    assert (sub == 0).all() and labels == ["none (setting)"] * 3
    sub, _, _ = rounding_correction(ds, "storage")
    np.testing.assert_array_equal(sub, [1e-15, 1e-15, 1e-6])
    with pytest.raises(ValueError, match="rounding_correction"):
        rounding_correction(ds, "maybe")


def _to_grid(src, dst):
    """The same series with every value rounded to bf16 and saved as fp32 (pure-bf16 export)."""
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors":
            save_file(
                {k: v.bfloat16().float() for k, v in load_file(str(f)).items()}, str(dst / f.name)
            )
        else:
            (dst / f.name).write_bytes(f.read_bytes())


def test_store_says_which_correction_was_used(tmp_path, dask_cluster):
    specs = [LayerSpec(noise_std=0.02, curvature_min=1e-3)]
    cluster = ClusterSettings(scheduler_address=dask_cluster.scheduler_address)
    for dtype in ("F32", "BF16"):
        simulate_quadratic_series(
            tmp_path / "sweep" / dtype.lower(),
            specs,
            [(150, 0.03)],
            checkpoint_every=10,
            dtype=dtype,
            seed=0,
        )
    _to_grid(tmp_path / "sweep" / "f32", tmp_path / "sweep" / "pure_bf16")
    store = analyze(
        tmp_path / "sweep", tmp_path / "s.zarr", SETTINGS, cluster, {}, cache_dir=tmp_path / "cache"
    )
    tree = xr.open_datatree(store, engine="zarr").load()
    got = {
        run: (
            str(tree[run].rounding_correction.values[0]),
            int(tree[run].on_bf16_grid.values.min()),
        )
        for run in ("f32", "bf16", "pure_bf16")
    }
    print(f"\n[bf16] {got}")
    assert got["f32"] == ("F32 storage rounding subtracted", 0)
    assert got["bf16"] == ("bf16 export rounding subtracted (assumes fp32 master weights)", 1)
    assert got["pure_bf16"] == ("none (pure-bf16 training exported to F32)", 1)
