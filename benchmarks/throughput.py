"""How fast and in how much memory `thermoscope analyze` runs end to end, against the raw read
rate of the same files: throughput (full and marginal), memory at several checkpoint counts,
scaling in checkpoint and parameter count, and a 1B-parameter bf16 series.

Usage (see benchmarks/README.md):
    python benchmarks/throughput.py [--mode throughput|memory|scaling|big|all] --size 512
           --checkpoints 8 [--dtype bf16|fp32] [--spectral] [--workers W] [--json]
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import MB, Series, gb, linear_fit, main, raw_read_rate, run_analyze


def throughput(root: Path, size_mb, n, dtype="fp32", spectral=False, workers=None) -> dict:
    """Full run on n checkpoints and on n//2 (hard links), raw read rate, ratios, marginal rate."""
    s = Series(root / "series", size_mb, dtype)
    s.extend(n)
    raw = raw_read_rate(s.files)
    n1 = max(1, n // 2)
    half = s.subset(root / f"first{n1}", n1)
    out = {
        "size_mb": size_mb,
        "checkpoints": n,
        "dtype": dtype,
        "n_params": s.n_params,
        "bytes": raw["bytes"],
        "raw_bytes_per_s": raw["raw_bytes_per_s"],
        "raw_by_buffer": raw["raw_by_buffer"],
    }
    runs = {"default": False, **({"spectral": True} if spectral else {})}
    for label, spec in runs.items():
        full = run_analyze(s.folder, root / f"{label}.zarr", root / f"{label}.cache", spec, workers)
        part = run_analyze(
            half, root / f"{label}{n1}.zarr", root / f"{label}{n1}.cache", spec, workers
        )
        bytes1 = sum(f.stat().st_size for f in s.files[:n1])
        rate = raw["bytes"] / full["wall_s"]
        marginal = (raw["bytes"] - bytes1) / max(full["wall_s"] - part["wall_s"], 1e-9)
        out[label] = {
            "wall_s": full["wall_s"],
            "bytes_per_s": rate,
            "ratio": rate / raw["raw_bytes_per_s"],
            "wall_s_first_half": part["wall_s"],
            "checkpoints_first_half": n1,
            "marginal_bytes_per_s": marginal,
            "marginal_ratio": marginal / raw["raw_bytes_per_s"],
            "peak_anon_bytes": max(full["peak_anon_bytes"], part["peak_anon_bytes"]),
            "command": full["command"],
        }
    shutil.rmtree(root / "series")
    return out


def memory(root: Path, size_mb=1024, counts=(4, 12), dtype="fp32", workers=None) -> dict:
    """Peak anonymous memory for the same checkpoint size at several checkpoint counts."""
    s = Series(root / "mem", size_mb, dtype)
    rows = []
    for n in counts:
        s.extend(n - len(s.files))
        r = run_analyze(s.folder, root / f"mem{n}.zarr", root / f"mem{n}.cache", workers=workers)
        rows.append({"checkpoints": n, "bytes": sum(f.stat().st_size for f in s.files), **r})
    shutil.rmtree(s.folder)
    return {"size_mb": size_mb, "dtype": dtype, "n_params": s.n_params, "rows": rows}


def scaling(
    root: Path,
    size_mb=256,
    counts=(8, 12, 16),
    sizes=(64, 128, 256),
    n=8,
    dtype="fp32",
    workers=None,
) -> dict:
    """Wall time vs checkpoint count (fixed size) and vs parameter count (fixed count), with fits.
    Counts start at max_lag = ensemble_window = 8: below that the work per checkpoint still grows
    (fewer lags in the band, no ensemble window closed), so shorter series are not steady state."""
    s = Series(root / "count", size_mb, dtype)
    by_count = []
    for c in counts:
        s.extend(c - len(s.files))
        by_count.append(
            {
                "checkpoints": c,
                **run_analyze(s.folder, root / f"c{c}.zarr", root / f"c{c}.cache", workers=workers),
            }
        )
    shutil.rmtree(s.folder)
    by_size = []
    for mb in sizes:
        t = Series(root / f"size{mb}", mb, dtype)
        t.extend(n)
        by_size.append(
            {
                "size_mb": mb,
                "n_params": t.n_params,
                **run_analyze(
                    t.folder, root / f"s{mb}.zarr", root / f"s{mb}.cache", workers=workers
                ),
            }
        )
        shutil.rmtree(t.folder)
    return {
        "by_count": by_count,
        "count_fit": linear_fit(counts, [r["wall_s"] for r in by_count]),
        "by_size": by_size,
        "size_fit": linear_fit([r["n_params"] for r in by_size], [r["wall_s"] for r in by_size]),
    }


def big(root: Path, n_params=1e9, n=5, workers=None) -> dict:
    """A 1B-parameter bf16 series of n checkpoints (checks free disk first)."""
    need = n_params * 2 * n * 1.05
    free = shutil.disk_usage(root).free
    if free < need + 4e9:
        return {"skipped": f"needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"}
    s = Series(root / "big", n_params * 2 / MB, "bf16", n_blocks=20)
    t = time.perf_counter()
    s.extend(n)
    gen = time.perf_counter() - t
    raw = raw_read_rate(s.files, repeats=1)
    r = run_analyze(s.folder, root / "big.zarr", root / "big.cache", workers=workers)
    shutil.rmtree(s.folder)
    return {
        "n_params": s.n_params,
        "checkpoints": n,
        "bytes": raw["bytes"],
        "generate_s": gen,
        "raw_bytes_per_s": raw["raw_bytes_per_s"],
        **r,
        "bytes_per_s": raw["bytes"] / r["wall_s"],
        "ratio": raw["bytes"] / r["wall_s"] / raw["raw_bytes_per_s"],
    }


def format_throughput(r: dict) -> str:
    lines = [
        f"\nthroughput: {r['checkpoints']} x {r['size_mb']} MB {r['dtype']} "
        f"({r['n_params']:,} params), raw read {gb(r['raw_bytes_per_s'])} GB/s (best of buffers: "
        + ", ".join(f"{int(k) >> 10} KiB {gb(v)}" for k, v in r["raw_by_buffer"].items())
        + ")",
        f"{'metrics':10s} {'wall s':>8s} {'GB/s':>6s} {'ratio':>6s} {'marg GB/s':>9s} "
        f"{'marg ratio':>10s} {'peak anon GB':>12s}",
    ]
    for label in ("default", "spectral"):
        if label in r:
            x = r[label]
            lines.append(
                f"{label:10s} {x['wall_s']:8.2f} {gb(x['bytes_per_s']):>6s} {x['ratio']:6.2f} "
                f"{gb(x['marginal_bytes_per_s']):>9s} {x['marginal_ratio']:10.2f} "
                f"{gb(x['peak_anon_bytes']):>12s}"
            )
    return "\n".join(lines)


def format_memory(r: dict) -> str:
    lines = [f"\nmemory: {r['size_mb']} MB {r['dtype']} checkpoints"]
    for x in r["rows"]:
        lines.append(
            f"  {x['checkpoints']:3d} checkpoints: wall {x['wall_s']:7.2f} s, "
            f"peak anon {gb(x['peak_anon_bytes'])} GB"
        )
    return "\n".join(lines)


def format_scaling(r: dict) -> str:
    lines = ["\nscaling in checkpoint count:"]
    lines += [f"  {x['checkpoints']:3d} checkpoints: {x['wall_s']:7.2f} s" for x in r["by_count"]]
    f = r["count_fit"]
    lines.append(
        f"  fit: {f['intercept']:.2f} s + {f['slope']:.3f} s/checkpoint, R^2 {f['r2']:.4f}"
    )
    lines.append("scaling in parameter count:")
    lines += [f"  {x['n_params']:>13,d} params: {x['wall_s']:7.2f} s" for x in r["by_size"]]
    f = r["size_fit"]
    lines.append(
        f"  fit: {f['intercept']:.2f} s + {f['slope'] * 1e6:.4f} s/Mparam, R^2 {f['r2']:.4f}"
    )
    return "\n".join(lines)


def format_big(r: dict) -> str:
    if "skipped" in r:
        return "\nbig: " + r["skipped"]
    return (
        f"\nbig: {r['checkpoints']} x {r['n_params']:,} params bf16 ({gb(r['bytes'])} GB): "
        f"wall {r['wall_s']:.1f} s, {gb(r['bytes_per_s'])} GB/s = {r['ratio']:.2f}x raw "
        f"({gb(r['raw_bytes_per_s'])} GB/s), peak anon {gb(r['peak_anon_bytes'])} GB"
    )


MODES = {
    "throughput": (
        lambda root, a: throughput(root, a.size, a.checkpoints, a.dtype, a.spectral, a.workers),
        format_throughput,
    ),
    "memory": (lambda root, a: memory(root, dtype=a.dtype, workers=a.workers), format_memory),
    "scaling": (
        lambda root, a: scaling(
            root, a.size, sizes=(a.size / 4, a.size / 2, a.size), dtype=a.dtype, workers=a.workers
        ),
        format_scaling,
    ),
    "big": (lambda root, a: big(root, workers=a.workers), format_big),
}


def _options(p) -> None:
    p.add_argument("--spectral", action="store_true", help="throughput: also time --spectral")


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], MODES, setup=_options))
