"""What reading the optimizer state costs: `thermoscope analyze` of the same checkpoints with
their Adam state (Hugging Face layout: ``checkpoint-<step>/model.safetensors`` + the real
``optimizer.pt``, written by ``torch.optim.AdamW`` through ``testing.optim_series``) and
without it (hard links to the model files only), alternating, best of ``--repeats``; both also
net of the start-up (the same command on a 1-checkpoint tiny series). The preconditioned band
reads ``exp_avg_sq`` rows of each measured checkpoint (memory-mapped) beside the weights.

Usage: python benchmarks/optimizer.py --size 64 --checkpoints 12 [--repeats 2]
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import MB, main, raw_read_rate, run_analyze, tiny_series


def adam_series(folder: Path, size_mb: float, n: int):
    """``n`` checkpoints of AdamW on diagonal quadratics, layers of distinct shapes (so the
    state maps to tensors by shape) totalling about ``size_mb`` MB of fp32 weights."""
    from pipeline.testing.optim_series import QuadraticLayer, simulate_optimizer_series

    d = max(64, int((size_mb * MB / 4 / 12.25) ** 0.5) // 64 * 64)  # 3d^2 + d^2 + 4d^2 + 4d^2
    shapes = {"attn.qkv.weight": (3 * d, d), "attn.out.weight": (d, d)}
    shapes.update({"mlp.up.weight": (4 * d, d), "mlp.down.weight": (d, 4 * d), "norm.weight": (d,)})
    layers = [QuadraticLayer(name, shape, noise=1.0) for name, shape in shapes.items()]
    return simulate_optimizer_series(folder, layers, plateaus=((n, 1e-3),), save_every=1)


def _weights_only(series: Path, into: Path) -> Path:
    """The same checkpoints without their optimizer state (hard links: same page-cache pages)."""
    for ckpt in sorted(series.iterdir()):
        (into / ckpt.name).mkdir(parents=True)
        for f in ckpt.iterdir():
            if f.name != "optimizer.pt":
                os.link(f, into / ckpt.name / f.name)
    return into


def with_and_without(root: Path, size_mb: float, n: int, repeats: int = 2, workers=None) -> dict:
    truth = adam_series(root / "adam", size_mb, n)
    folders = {"with state": truth.out_dir, "without": _weights_only(truth.out_dir, root / "w")}
    model = sorted(truth.out_dir.glob("*/model.safetensors"))
    state = sorted(truth.out_dir.glob("*/optimizer.pt"))
    raw = raw_read_rate(model + state, repeats=1)  # also warms the page cache
    tiny = tiny_series(root, "opt-tiny")
    start = min(  # best of two: the first run of a session pays cold caches
        run_analyze(tiny.folder, root / f"t{i}.zarr", root / f"t{i}.cache", workers=workers)[
            "wall_s"
        ]
        for i in range(2)
    )
    walls = {label: [] for label in folders}
    for r in range(repeats):
        for label in folders if r % 2 == 0 else list(folders)[::-1]:
            store = root / f"{label.split()[0]}{r}.zarr"
            cache = store.with_suffix(".cache")
            walls[label].append(
                run_analyze(folders[label], store, cache, workers=workers)["wall_s"]
            )
    best = {label: min(w) for label, w in walls.items()}
    kernel = {label: _kernel_seconds(folder, repeats) for label, folder in folders.items()}
    used = _precond_measured(root / "with0.zarr")
    model_bytes = sum(f.stat().st_size for f in model)
    state_bytes = sum(f.stat().st_size for f in state)
    shutil.rmtree(root / "adam")
    return {
        "size_mb": size_mb,
        "checkpoints": n,
        "repeats": repeats,
        "model_bytes": model_bytes,
        "state_bytes": state_bytes,
        "raw_bytes_per_s": raw["raw_bytes_per_s"],
        "startup_s": start,
        "wall_s": best,
        "all": walls,
        "ratio": best["with state"] / best["without"],
        "net_ratio": (best["with state"] - start) / max(best["without"] - start, 1e-9),
        "precond_values": used,
        "kernel_s": kernel,
        "kernel_ratio": kernel["with state"] / kernel["without"],
        "net_s_per_model_gb": {k: (v - start) / model_bytes * 1e9 for k, v in best.items()},
    }


def _kernel_seconds(folder: Path, repeats: int) -> float:
    """Best-of-``repeats`` seconds of ``measure_block`` over every row-block task the measure
    stage builds for ``folder`` (with the preconditioner sources when it holds Adam state),
    one torch thread, no Dask: the measure stage's work per core, without start-up."""
    import time

    import torch

    from pipeline.ingest.discovery import discover
    from pipeline.measure.graph import _block_tasks
    from pipeline.measure.kernel import measure_block
    from pipeline.settings import MeasureSettings

    settings = MeasureSettings()
    run = discover(str(folder)).runs[0]
    tasks = [
        t
        for blocks in _block_tasks(run, settings, {x.name: 0 for x in run.tensors}).values()
        for t in blocks
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for task in tasks:
                measure_block(task, settings)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best


def _precond_measured(store: Path) -> int:
    """Finite values of the preconditioned band in a store: > 0 when the state was read."""
    import numpy as np

    from pipeline.store.zarr_io import open_tree

    tree = open_tree(store)
    return sum(
        int(np.isfinite(node.dataset["sq_distance_precond"].values).sum())
        for node in tree.subtree
        if "sq_distance_precond" in node.dataset
    )


def format_optimizer(r: dict) -> str:
    w = r["wall_s"]
    per = r["net_s_per_model_gb"]
    return (
        f"\noptimizer state: {r['checkpoints']} checkpoints, model {r['model_bytes'] / 1e9:.2f} GB"
        f" + Adam state {r['state_bytes'] / 1e9:.2f} GB (best of {r['repeats']}, alternating)\n"
        f"  analyze with state {w['with state']:.2f} s, without {w['without']:.2f} s: "
        f"{r['ratio']:.2f}x; net of the start-up ({r['startup_s']:.2f} s): "
        + (
            f"{per['with state']:.2f} vs {per['without']:.2f} s per model GB = "
            f"{r['net_ratio']:.2f}x"
            if min(per.values()) > 0
            else "not separable (the tiny run took longer than a full one)"
        )
        + f" ({r['precond_values']} preconditioned band values measured)\n"
        f"  measure kernel alone (one thread, no Dask): with state "
        f"{r['kernel_s']['with state']:.2f} s, without {r['kernel_s']['without']:.2f} s: "
        f"{r['kernel_ratio']:.2f}x per model byte"
    )


MODES = {
    "optimizer": (
        lambda root, a: with_and_without(root, a.size, a.checkpoints, a.repeats, a.workers),
        format_optimizer,
    )
}


def _options(p) -> None:
    p.add_argument("--repeats", type=int, default=2)
    p.set_defaults(size=64, checkpoints=12, no_startup=True)


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], MODES, setup=_options))
