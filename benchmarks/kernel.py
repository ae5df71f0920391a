"""The default measure kernel before and after a change, in the same run on the same files.

"Before" is the ``pipeline`` package of a git ref (``--base``, exported with ``git archive``),
"after" this checkout. Each runs in its own child process (one torch thread, no Dask) that
builds the measure stage's row-block tasks of the series and, on each request, times
``measure_block`` over every block and ``finalize_layer`` over every layer (what the measure
stage computes per core); the parent alternates the two children ``--repeats`` times and keeps
the best of each, so machine load hits both alike. Then `thermoscope analyze` runs the series
once with each tree and ``largest_differences`` compares the two stores variable by variable.

Usage: python benchmarks/kernel.py --size 128 --checkpoints 16 [--base REF] [--repeats 5]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    REPO,
    Series,
    code_env,
    export_tree,
    gb,
    main,
    raw_read_rate,
    run_analyze,
)

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
BASE = "171cd1e"  # main just before issue 18's kernel changes (fcfbc5a; benchmarks/RESULTS.md)


def child() -> None:
    """A child's loop: a JSON task spec on the first stdin line, then one timing per line read,
    answered as a JSON line {"blocks_s", "finalize_s"} on stdout."""
    import time
    from collections import defaultdict

    import torch

    from pipeline.core.manifest import TensorInfo
    from pipeline.measure.kernel import BlockTask, finalize_layer, layer_blocks, measure_block
    from pipeline.settings import MeasureSettings

    torch.set_num_threads(1)
    spec = json.loads(sys.stdin.readline())
    settings = MeasureSettings(**spec.get("settings", {}))
    files, steps = tuple(spec["files"]), tuple(spec["steps"])
    tasks = [
        BlockTask("run", t, a, b, files, steps)
        for t in (TensorInfo(n, tuple(shape), code) for n, shape, code in spec["tensors"])
        for a, b in layer_blocks(t, settings)
    ]
    for _ in sys.stdin:
        layers = defaultdict(list)
        t0 = time.perf_counter()
        for task in tasks:
            layers[task.tensor.name].append(measure_block(task, settings))
        t1 = time.perf_counter()
        for blocks in layers.values():
            finalize_layer(blocks)
        t2 = time.perf_counter()
        print(json.dumps({"blocks_s": t1 - t0, "finalize_s": t2 - t1}), flush=True)


class _Child:
    """A child process running ``child`` with the ``pipeline`` package of the tree ``code``."""

    def __init__(self, code: Path, spec: dict):
        boot = (
            f"import sys; sys.path[:0] = [{str(code)!r}, {str(REPO)!r}]; "
            "from benchmarks.kernel import child; child()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot],
            cwd=code,
            env={**code_env(code), **ONE_THREAD},  # per core: torch, OpenMP and BLAS pools
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.proc.stdin.write(json.dumps(spec) + "\n")

    def time(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"kernel child exited ({self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _series_spec(s: Series, n: int) -> dict:
    return {
        "files": [str(f) for f in s.files[:n]],
        "steps": list(range(0, 100 * n, 100)),
        "tensors": [[name, list(t.shape), s.code] for name, t in s.state.items()],
    }


def before_after(
    root: Path, size_mb, n, dtype="fp32", base=BASE, repeats=5, spectral=False, every=1, head=None
) -> dict:
    """Best-of-``repeats`` kernel times of ``base`` and this checkout, alternating on the same
    files, and the largest difference between the stores `thermoscope analyze` writes with
    each (relative to each variable's scale). ``spectral``: both with the SVD metrics;
    ``every`` > 1: "after" computes them every ``every``-th checkpoint only (the stores are
    then compared at the checkpoints both have)."""
    from pipeline.store.zarr_io import open_tree
    from pipeline.testing.compare import largest_differences

    s = Series(root / "kernel", size_mb, dtype)
    s.extend(n)
    raw = raw_read_rate(s.files)
    after = export_tree(head, root / "head") if head else REPO
    trees = {"before": export_tree(base, root / "base"), "after": after}
    options = {"before": {"spectral": spectral}, "after": {"spectral": spectral}}
    if every > 1:
        options["after"]["spectral_every"] = every
    children = {
        label: _Child(code, {**_series_spec(s, n), "settings": options[label]})
        for label, code in trees.items()
    }
    runs: dict[str, list[dict]] = {label: [] for label in trees}
    try:
        for r in range(repeats):  # alternate, and swap who goes first each round
            order = list(children) if r % 2 == 0 else list(children)[::-1]
            for label in order:
                runs[label].append(children[label].time())
    finally:
        for c in children.values():
            c.close()
    elems = s.n_params * n
    rows = {}
    for label, times in runs.items():
        best = min(times, key=lambda x: x["blocks_s"] + x["finalize_s"])
        rows[label] = {
            **best,
            "total_s": best["blocks_s"] + best["finalize_s"],
            "ns_per_elem": (best["blocks_s"] + best["finalize_s"]) / elems * 1e9,
            "all": times,
        }
    stores = {}
    for label, code in trees.items():
        stores[label] = root / f"{label}.zarr"
        params = None
        if every > 1 and label == "after":
            params = root / "every.yaml"  # only this key: the tree may predate others
            params.write_text(f"measure:\n  spectral_every: {every}\n")
        rows[label]["analyze_s"] = run_analyze(
            s.folder, stores[label], root / f"{label}.cache", spectral, params=params, code=code
        )["wall_s"]
    after, before = open_tree(stores["after"]), open_tree(stores["before"])
    if every > 1:  # the checkpoints where "after" computed spectra (NaN elsewhere by design)
        after, before = (t.isel(step=slice(None, None, every)) for t in (after, before))
    diffs = largest_differences(after, before)
    finite = {k: v for k, v in diffs.items() if v == v}  # NaN: nothing finite to compare
    worst = max(finite, key=finite.get)
    return {
        "size_mb": size_mb,
        "checkpoints": n,
        "dtype": dtype,
        "spectral": spectral,
        "spectral_every": every,
        "n_params": s.n_params,
        "base": base,
        "head": head or _head(),
        "repeats": repeats,
        "raw_bytes_per_s": raw["raw_bytes_per_s"],
        "load_avg_end": os.getloadavg(),
        "runs": rows,
        "speedup": rows["before"]["total_s"] / rows["after"]["total_s"],
        "speedup_blocks": rows["before"]["blocks_s"] / rows["after"]["blocks_s"],
        "variables": len(diffs),
        "variables_equal": sum(v == 0 for v in diffs.values()),
        "variables_all_nan": sum(v != v for v in diffs.values()),
        "largest_difference": finite[worst],
        "largest_difference_variable": worst,
        "differences": diffs,
    }


def _head() -> str:
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    )
    return done.stdout.strip()


def format_kernel(r: dict) -> str:
    lines = [
        f"\nkernel (one torch thread, no Dask; best of {r['repeats']}, alternating): "
        f"{r['checkpoints']} x {r['size_mb']} MB {r['dtype']} ({r['n_params']:,} params"
        + (f", --spectral every {r['spectral_every']}" if r["spectral"] else "")
        + "), "
        f"raw read {gb(r['raw_bytes_per_s'])} GB/s, load at the end "
        + " ".join(f"{x:.1f}" for x in r["load_avg_end"]),
        f"  {'code':22s} {'blocks s':>9s} {'finalize s':>10s} {'total s':>8s} {'ns/elem':>8s} "
        f"{'analyze s':>9s} {'s/ckpt':>7s}",
    ]
    for label, ref in (("before", r["base"]), ("after", r["head"])):
        x = r["runs"][label]
        lines.append(
            f"  {label + ' (' + ref + ')':22s} {x['blocks_s']:9.3f} {x['finalize_s']:10.3f} "
            f"{x['total_s']:8.3f} {x['ns_per_elem']:8.2f} {x['analyze_s']:9.2f} "
            f"{x['total_s'] / r['checkpoints']:7.3f}"
        )
    lines.append(
        f"  speedup {r['speedup']:.2f}x (measure_block alone {r['speedup_blocks']:.2f}x); stores: "
        f"{r['variables']} variables, {r['variables_equal']} equal, {r['variables_all_nan']} "
        "NaN in both, largest difference "
        f"{r['largest_difference']:.1e} ({r['largest_difference_variable']})"
    )
    return "\n".join(lines)


MODES = {
    "kernel": (
        lambda root, a: before_after(
            root,
            a.size,
            a.checkpoints,
            a.dtype,
            a.base,
            a.repeats,
            a.spectral,
            a.spectral_every,
            a.head,
        ),
        format_kernel,
    )
}


def _options(p) -> None:
    p.add_argument("--base", default=BASE, help="git ref of the 'before' code")
    p.add_argument("--head", default=None, help="git ref of the 'after' code (default: this tree)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--spectral", action="store_true", help="both with the SVD metrics")
    p.add_argument("--spectral-every", type=int, default=1, help="'after' only: every k-th")
    p.set_defaults(size=128, checkpoints=16, no_startup=True)


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], MODES, setup=_options))
