"""The GPU path (torch on ``cuda``, dask-cuda workers) gives the CPU path's numbers.

Skipped where no CUDA device is visible (CI); run on a GPU machine with
``pytest tests/test_gpu.py -s`` (``benchmarks/gpu_check.sh`` does, and records the figures).
Both paths read the same fp32 values (bf16 checkpoints are widened exactly) and reduce them in
fp32 chunks accumulated in float64; only the order of the fp32 additions differs, so sums and
dot products agree to a few fp32 rounding steps relative to their scale. TF32 must be off:
with it, the band's dot products would carry ~1e-3 relative errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoint_factory import write_random_walk

from pipeline.analyze import analyze
from pipeline.core.manifest import TensorInfo
from pipeline.measure.kernel import BlockTask, measure_block
from pipeline.measure.parallel import dask_client
from pipeline.settings import ClusterSettings, MeasureSettings
from pipeline.store.zarr_io import open_tree
from pipeline.testing.compare import largest_differences, relative_difference
from pipeline.testing.simulate import LayerSpec, simulate_quadratic_series

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")

ROWS, COLS, N_CKPT = 512, 300, 11  # 153,600 elements: two slices of the default slice size
TOLERANCE = 1e-5  # largest difference relative to the statistic's scale (fp32 eps 1.2e-7)


def _task(tmp_path, dtype) -> BlockTask:
    """A (ROWS, COLS) random walk in ``dtype``, a NaN and an Inf at checkpoint 6; one block."""
    _, files, steps = write_random_walk(
        tmp_path, (ROWS, COLS), N_CKPT, nan_at=(6, 3, 4), seed=7, dtype=dtype
    )
    code = {torch.float32: "F32", torch.bfloat16: "BF16"}[dtype]
    return BlockTask("run", TensorInfo("w", (ROWS, COLS), code), 0, ROWS, files, steps, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "slice_elems", [131072, 1 << 22]
)  # the CPU's slices; the GPU takes the whole block
def test_measure_block_on_gpu_matches_cpu(tmp_path, dtype, slice_elems):
    task = _task(tmp_path, dtype)
    settings = {
        d: MeasureSettings(
            max_lag=4,
            ensemble_window=4,
            entropy_sample=4096,
            slice_elems=slice_elems,
            spectral=True,
            device=d,
        )
        for d in ("cpu", "cuda")
    }
    cpu, gpu = (measure_block(task, settings[d]) for d in ("cpu", "cuda"))
    for exact in (
        "count",
        "nonfinite",
        "ensemble_frozen",
        "sample",
    ):  # same fp32 values, no arithmetic
        np.testing.assert_array_equal(gpu[exact], cpu[exact], err_msg=exact)
    for name in ("sum", "sumsq", "sq_distance", "ensemble_log_var", "spectral"):
        diff = relative_difference(gpu[name], cpu[name])
        print(f"{dtype} cpu slice {slice_elems}: {name} largest relative difference {diff:.2e}")
        assert diff <= TOLERANCE, name


def _worker_precision():
    import torch

    return (
        torch.cuda.is_available(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.get_float32_matmul_precision(),
    )


def test_gpu_workers_compute_in_full_fp32():
    with dask_client(ClusterSettings()) as client:
        assert type(client.cluster).__name__ == "LocalCUDACluster"
        on_workers = client.run(_worker_precision)
    assert on_workers and all(v == (True, False, "highest") for v in on_workers.values()), (
        on_workers
    )


def test_store_from_gpu_workers_matches_cpu_workers(tmp_path):
    """Langevin dynamics (SGD with Gaussian gradient noise on quadratics, bf16 checkpoints, two
    LR plateaus): the thermodynamic variables are finite, and the GPU store equals the CPU one
    to 1e-4 of each variable's scale (derived quantities amplify the ~1e-7 differences of the
    measured sums)."""
    specs = [
        LayerSpec(noise_std=s, curvature_min=0.1, weight_scale=0.1) for s in (0.01, 0.02, 0.04)
    ]
    simulate_quadratic_series(
        tmp_path / "run", specs, [(160, 0.01), (160, 0.03)], checkpoint_every=4, dtype="BF16"
    )
    common = dict(max_lag=8, ensemble_window=8, entropy_sample=4096, block_elems=64, spectral=True)
    cpu = analyze(
        tmp_path / "run",
        tmp_path / "cpu.zarr",
        MeasureSettings(device="cpu", **common),
        ClusterSettings(gpu="off", n_workers=2),
    )
    gpu = analyze(
        tmp_path / "run", tmp_path / "gpu.zarr", MeasureSettings(**common), ClusterSettings()
    )
    diffs = largest_differences(open_tree(gpu), open_tree(cpu))
    for key, diff in sorted(diffs.items()):
        print(f"store {key}: largest relative difference {diff:.2e}")
    compared = {k: v for k, v in diffs.items() if not np.isnan(v)}
    assert {
        f"run/{v}"
        for v in (
            "temperature",
            "heat",
            "work",
            "sq_distance",
            "ensemble_entropy",
            "spectral_entropy",
        )
    } <= compared.keys()
    assert max(compared.values()) <= 1e-4, {k: v for k, v in compared.items() if v > 1e-4}
