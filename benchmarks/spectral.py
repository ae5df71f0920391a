"""`analyze --spectral` against WeightWatcher's formulas on the same matrices: numpy SVD of each
2-D layer per checkpoint with WeightWatcher's formulas (values and time), and
``weightwatcher.WeightWatcher.analyze`` per checkpoint when installed.

Usage: python benchmarks/spectral.py --size 256 --checkpoints 4 [--json]
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import Series, main, raw_read_rate, run_analyze


def ww_formulas(matrix: np.ndarray) -> tuple[float, float]:
    """WeightWatcher's spectral entropy and stable rank of one matrix, the way it computes them
    (RMT_Util.matrix_entropy / stable_rank): numpy SVD, rank = numpy matrix_rank tolerance,
    entropy = -sum p ln p / ln(rank) with p = s^2 / sum s^2, stable rank = sum s^2 / max s^2."""
    s = np.linalg.svd(matrix, compute_uv=False)
    tol = s.max() * max(matrix.shape) * np.finfo(s.dtype).eps
    rank = int((s > tol).sum())
    evals = s * s
    p = evals / evals.sum()
    p = p[p > 0]
    entropy = float(-(p * np.log(p)).sum() / np.log(rank if rank > 1 else 1.000001))
    return entropy, float(evals.sum() / evals.max())


def spectral_baselines(root: Path, size_mb=64, n=4, dtype="fp32", workers=None) -> dict:
    """--spectral analyze vs (a) numpy SVD of each 2-D layer per checkpoint with WW's formulas,
    (b) weightwatcher itself (when importable) on each checkpoint as a torch model."""
    import xarray as xr
    from safetensors.numpy import load_file

    s = Series(root / "spec", size_mb, dtype)
    s.extend(n)
    raw_read_rate(s.files, buffers=(1 << 20,), repeats=1)  # warm the page cache
    ours = run_analyze(
        s.folder, root / "spec.zarr", root / "spec.cache", spectral=True, workers=workers
    )
    t = time.perf_counter()
    base = {}
    for i, f in enumerate(s.files):
        tensors = (
            load_file(f)
            if dtype == "fp32"
            else {k: v.float().numpy() for k, v in _torch_load(f).items()}
        )
        for name, w in tensors.items():
            if w.ndim == 2:
                base[(i, name)] = ww_formulas(w.astype(np.float64))
    numpy_s = time.perf_counter() - t
    tree = xr.open_datatree(root / "spec.zarr", engine="zarr")
    ds = tree[list(tree.children)[0]].to_dataset()
    diffs = [
        max(
            abs(ds.spectral_entropy.isel(step=i).sel(layer=name).item() - e),
            abs(ds.stable_rank.isel(step=i).sel(layer=name).item() - r) / r,
        )
        for (i, name), (e, r) in base.items()
    ]
    out = {
        "size_mb": size_mb,
        "checkpoints": n,
        "analyze_spectral_s": ours["wall_s"],
        "numpy_svd_ww_formulas_s": numpy_s,
        "max_diff_vs_ww_formulas": max(diffs),
    }
    out.update(_weightwatcher(s.files))
    shutil.rmtree(s.folder)
    return out


def _torch_load(path):
    from safetensors.torch import load_file

    return load_file(path)


def _weightwatcher(files) -> dict:
    """Time weightwatcher.analyze on each checkpoint loaded into a torch model of Linear layers."""
    try:
        import logging

        import weightwatcher as ww

        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    except Exception as exc:  # noqa: BLE001 - optional baseline
        return {"weightwatcher": f"not available ({exc.__class__.__name__})"}
    t = time.perf_counter()
    frames = []
    for f in files:
        model = torch.nn.Sequential()
        for name, w in _torch_load(f).items():
            if w.dim() == 2:
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data = w.float()
                model.add_module(name.replace(".", "_"), lin)
        frames.append(
            ww.WeightWatcher(model=model).analyze(plot=False, randomize=False, mp_fit=False)
        )
    return {
        "weightwatcher_analyze_s": time.perf_counter() - t,
        "weightwatcher_version": ww.__version__,
        "weightwatcher_columns": [c for c in ("entropy", "stable_rank") if c in frames[0].columns],
    }


def format_spectral(r: dict) -> str:
    lines = [
        f"\nspectral: {r['checkpoints']} x {r['size_mb']} MB: analyze --spectral "
        f"{r['analyze_spectral_s']:.2f} s; numpy SVD + WW formulas "
        f"{r['numpy_svd_ww_formulas_s']:.2f} s; max |diff| {r['max_diff_vs_ww_formulas']:.2e}"
    ]
    if "weightwatcher_analyze_s" in r:
        lines.append(
            f"  weightwatcher {r['weightwatcher_version']} analyze on each checkpoint: "
            f"{r['weightwatcher_analyze_s']:.2f} s"
        )
    else:
        lines.append(f"  weightwatcher: {r['weightwatcher']}")
    return "\n".join(lines)


MODES = {
    "spectral": (
        lambda root, a: spectral_baselines(
            root, a.size, a.checkpoints, dtype=a.dtype, workers=a.workers
        ),
        format_spectral,
    )
}

if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], MODES))
