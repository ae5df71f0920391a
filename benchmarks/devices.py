"""The same series analysed with torch on CPU worker processes and on an accelerator (``--device``,
default ``cuda``: dask-cuda workers): wall times and every stored variable's largest difference
from the CPU store, relative to its scale.

Usage: python benchmarks/devices.py --size 1024 --checkpoints 8 [--spectral] [--device cuda]
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import Series, gb, main, params_file, raw_read_rate, run_analyze


def devices(
    root: Path, size_mb, n, dtype="fp32", spectral=False, workers=None, device="cuda"
) -> dict:
    """The same series analysed with torch on the CPU (CPU worker processes) and on ``device``
    (dask-cuda workers when it is ``cuda``): wall time, rate, and each stored variable's largest
    difference from the CPU store relative to its scale (``largest_differences``)."""
    from pipeline.store.zarr_io import open_tree
    from pipeline.testing.compare import largest_differences

    if device == "cpu":
        raise SystemExit("--device: name the accelerator to compare with the CPU (cuda)")
    s = Series(root / "dev", size_mb, dtype)
    s.extend(n)
    raw = raw_read_rate(s.files)
    configs = {
        "cpu": {"measure": {"device": "cpu"}, "dask": {"gpu": "off"}},  # the reference
        device: {"measure": {"device": device}},
    }
    runs, stores = {}, {}
    for i, (label, overrides) in enumerate(configs.items()):
        params = params_file(root / f"run{i}.yaml", overrides)
        stores[label] = root / f"run{i}.zarr"
        try:
            r = run_analyze(
                s.folder, stores[label], root / f"run{i}.cache", spectral, workers, params=params
            )
        except RuntimeError as exc:  # record it, and still time the other runs
            runs[label] = {"error": str(exc).strip().splitlines()[-1]}
            continue
        runs[label] = {
            **r,
            "bytes_per_s": raw["bytes"] / r["wall_s"],
            "ratio": raw["bytes"] / r["wall_s"] / raw["raw_bytes_per_s"],
        }
        if label != "cpu" and "error" not in runs.get("cpu", {}):
            diffs = largest_differences(open_tree(stores[label]), open_tree(stores["cpu"]))
            worst = max(
                diffs, key=lambda k: -math.inf if math.isnan(diffs[k]) else diffs[k]
            )  # NaN: nothing compared
            runs[label].update(
                largest_difference=diffs[worst],
                largest_difference_variable=worst,
                differences=diffs,
            )
    shutil.rmtree(s.folder)
    return {
        "size_mb": size_mb,
        "checkpoints": n,
        "dtype": dtype,
        "spectral": spectral,
        "n_params": s.n_params,
        "bytes": raw["bytes"],
        "raw_bytes_per_s": raw["raw_bytes_per_s"],
        "runs": runs,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def format_devices(r: dict) -> str:
    lines = [
        f"\ndevices: {r['checkpoints']} x {r['size_mb']} MB {r['dtype']} ({r['n_params']:,} params"
        f"{', --spectral' if r['spectral'] else ''}), GPU {r['gpu']}, "
        f"raw read {gb(r['raw_bytes_per_s'])} GB/s",
        f"{'run':22s} {'wall s':>8s} {'GB/s':>6s} {'ratio':>6s} {'peak anon GB':>12s}  "
        "largest difference from cpu",
    ]
    for label, x in r["runs"].items():
        if "error" in x:
            lines.append(f"{label:22s} failed: {x['error']}")
            continue
        diff = (
            f"{x['largest_difference']:.1e} ({x['largest_difference_variable']})"
            if "largest_difference" in x
            else "-"
        )
        lines.append(
            f"{label:22s} {x['wall_s']:8.2f} {gb(x['bytes_per_s']):>6s} {x['ratio']:6.2f} "
            f"{gb(x['peak_anon_bytes']):>12s}  {diff}"
        )
    return "\n".join(lines)


MODES = {
    "devices": (
        lambda root, a: devices(
            root, a.size, a.checkpoints, a.dtype, a.spectral, a.workers, a.device
        ),
        format_devices,
    )
}


def _options(p) -> None:
    p.add_argument("--spectral", action="store_true", help="analyze --spectral on both devices")
    p.add_argument("--device", default="cuda", help="the accelerator compared with the CPU")


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], MODES, setup=_options))
