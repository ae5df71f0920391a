"""What a +1-checkpoint rerun costs against a checkpoint's share of the full run: `thermoscope
analyze` (or, with ``--via dvc``, `dvc repro` of the whole pipeline in a fresh DVC project), also
net of the start-up any run pays (the same command on a 1-checkpoint tiny series).

Usage: python benchmarks/incremental.py --size 512 [--checkpoints 20] [--via analyze|dvc] [--json]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    REPO,
    Series,
    main,
    raw_read_rate,
    repo_params,
    run_analyze,
    tiny_series,
)


def _analyze_runner(root: Path, folder: Path, workers=None):
    """Callable timing `thermoscope analyze` of ``folder`` (same store and cache every call)."""
    root.mkdir(parents=True, exist_ok=True)
    return lambda: run_analyze(folder, root / "inc.zarr", root / "inc.cache", workers=workers)[
        "wall_s"
    ]


def _dvc_runner(root: Path, folder: Path, workers=None):
    """Callable timing `dvc repro` of this repository's pipeline (dvc.yaml, stages/, params.yaml
    with ``checkpoints.dir`` = ``folder``) in a fresh DVC project under ``root``: index, measure,
    thermo and report stages, each a process, as a researcher runs it."""
    import yaml

    project = root / "dvc-project"
    project.mkdir(parents=True)
    for name in ("stages", "pipeline"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", project)
    params = repo_params()
    params["checkpoints"]["dir"] = str(folder)
    params["dask"]["n_workers"] = workers
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    subprocess.run(
        ["dvc", "init", "--no-scm", "-q"], cwd=project, env=env, check=True
    )  # stages run `python`

    def run() -> float:
        t = time.perf_counter()
        done = subprocess.run(
            ["dvc", "repro", "-q"], cwd=project, env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"dvc repro failed: {(done.stdout + done.stderr)[-2000:]}")
        return time.perf_counter() - t

    return run


RUNNERS = {"analyze": _analyze_runner, "dvc": _dvc_runner}


def incremental(root: Path, size_mb=64, n=20, dtype="fp32", workers=None, via="analyze") -> dict:
    """Full run on n checkpoints, then add one and rerun with the same cache and store; also
    both net of the start-up (the same command on a 1-checkpoint tiny series, which any run
    pays). ``via``: time `thermoscope analyze` or `dvc repro` (all four stages)."""
    tiny = tiny_series(root, "inc-tiny")
    start = RUNNERS[via](root / "inc-tiny-run", tiny.folder, workers)()
    s = Series(root / "inc", size_mb, dtype)
    s.extend(n)
    raw_read_rate(s.files, buffers=(1 << 20,), repeats=1)  # warm the page cache
    run = RUNNERS[via](root, s.folder, workers)
    full = run()
    s.extend(1)
    raw_read_rate(s.files[-1:], buffers=(1 << 20,), repeats=1)
    rerun = run()
    share = full / n
    net_share = (full - start) / n
    shutil.rmtree(s.folder)
    return {
        "via": via,
        "size_mb": size_mb,
        "checkpoints": n,
        "full_wall_s": full,
        "per_checkpoint_s": share,
        "rerun_wall_s": rerun,
        "rerun_over_share": rerun / share,
        "startup_s": start,
        "net_rerun_over_net_share": (rerun - start) / net_share,
    }


def format_incremental(r: dict) -> str:
    net_share = (r["full_wall_s"] - r["startup_s"]) / r["checkpoints"]
    return (
        f"\nincremental ({r['via']}): full {r['checkpoints']} x {r['size_mb']} MB: "
        f"{r['full_wall_s']:.2f} s ({r['per_checkpoint_s']:.2f} s/checkpoint); +1 checkpoint "
        f"rerun {r['rerun_wall_s']:.2f} s = {r['rerun_over_share']:.2f}x the per-checkpoint share"
        f"\n  net of the start-up ({r['startup_s']:.2f} s, the same on a 1-checkpoint tiny "
        f"series): rerun {r['rerun_wall_s'] - r['startup_s']:.2f} s = "
        f"{r['net_rerun_over_net_share']:.2f}x the net share {net_share:.2f} s"
    )


MODES = {
    "incremental": (
        lambda root, a: incremental(
            root, a.size, n=a.checkpoints, dtype=a.dtype, workers=a.workers, via=a.via
        ),
        format_incremental,
    )
}


def _options(p) -> None:
    p.add_argument("--via", choices=sorted(RUNNERS), default="analyze")
    p.set_defaults(checkpoints=20, no_startup=True)


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], MODES, setup=_options))
