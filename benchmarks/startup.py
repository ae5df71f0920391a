"""Start-up of `thermoscope analyze`, before and after a change: the time from launching the
command to its first measured layer (``first_layer_s``: the progress line "1/N" on stderr) and
to its exit (``wall_s``), on a 1-checkpoint tiny series where nothing else costs time.

Three ways to run: a fresh local cluster (worker processes forked from the preloaded server;
keep-alive off), joining a cluster that is already running (``--scheduler``: one scheduler and
two single-thread workers started from the same code tree beforehand, as a user keeps one up
between runs), and keep-alive on, the default since issue 18 ("after" only): a first run that
launches the resident cluster and joins it, and a next run that joins it
(``pipeline/measure/resident.py``). "Before" is the ``pipeline`` package of a git ref (``--base``,
exported with ``git archive``), "after" this checkout; the runs alternate, best of
``--repeats`` each.

Usage: python benchmarks/startup.py [--base REF] [--repeats 3]
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, code_env, export_tree, main, tiny_series
from benchmarks.kernel import BASE

FIRST = re.compile(rb"\|\s*1/\d+ \[")  # tqdm's progress bar after the first layer


def time_analyze(
    folder: Path, store: Path, code: Path, scheduler: str | None = None, env: dict | None = None
) -> dict:
    """Seconds from launch to the first measured layer and to exit of `thermoscope analyze`
    (fresh cache and store) with the ``pipeline`` package of the tree ``code``; ``env``: extra
    environment (``code_env`` turns resident clusters off)."""
    cmd = [sys.executable, "-m", "pipeline.cli", "analyze", str(folder), "--store", str(store)]
    cmd += ["--cache", str(store.with_suffix(".cache"))]
    if scheduler:
        cmd += ["--scheduler", scheduler]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=code,
        env={**code_env(code), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first, seen = [float("nan")], bytearray()

    def watch():
        while chunk := proc.stderr.read1(4096):
            seen.extend(chunk)
            if first[0] != first[0] and FIRST.search(seen):
                first[0] = time.perf_counter() - t0

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    proc.stdout.read()
    proc.wait()
    wall = time.perf_counter() - t0
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"analyze failed ({proc.returncode}): {seen.decode()[-2000:]}")
    return {"first_layer_s": first[0], "wall_s": wall}


class RunningCluster:
    """A scheduler and ``workers`` single-thread worker processes importing ``pipeline`` from
    the tree ``code`` (started once, as a user keeps a cluster up), stopped on ``close``."""

    def __init__(self, code: Path, root: Path, workers: int = 2):
        from distributed import Client

        self.file = root / f"scheduler-{abs(hash(str(code)))}.json"
        env, dask = code_env(code), [sys.executable, "-m"]
        self.procs = [
            subprocess.Popen(
                dask + ["distributed.cli.dask_scheduler", "--scheduler-file", str(self.file)]
                + ["--port", "0", "--dashboard-address", ":0"],
                cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        ]  # fmt: skip
        while not self.file.exists():
            time.sleep(0.1)
        self.procs.append(
            subprocess.Popen(
                dask + ["distributed.cli.dask_worker", "--scheduler-file", str(self.file)]
                + ["--nthreads", "1", "--nworkers", str(workers)]
                + ["--preload", "pipeline.measure.kernel"],  # imported once, as a used one has
                cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        with Client(scheduler_file=str(self.file)) as client:
            client.wait_for_workers(workers, timeout=120)
            self.address = client.scheduler.address

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            p.wait()


def before_after(root: Path, base=BASE, repeats=3, head=None) -> dict:
    """Best-of-``repeats`` start-up of ``base`` and this checkout, alternating, on a fresh
    local cluster and on a running one."""
    s = tiny_series(root)
    after = export_tree(head, root / "head") if head else REPO
    trees = {"before": export_tree(base, root / "base"), "after": after}
    out = {"base": base, "head": head or "this tree", "repeats": repeats, "fresh": {}}
    out["running"] = {}
    clusters = {label: RunningCluster(code, root) for label, code in trees.items()}
    try:
        for how in ("fresh", "running"):
            runs = {label: [] for label in trees}
            for r in range(repeats):
                for label in trees if r % 2 == 0 else list(trees)[::-1]:
                    address = clusters[label].address if how == "running" else None
                    store = root / f"{how}-{label}-{r}.zarr"
                    runs[label].append(time_analyze(s.folder, store, trees[label], address))
            for label, times in runs.items():
                out[how][label] = {
                    "first_layer_s": min(t["first_layer_s"] for t in times),
                    "wall_s": min(t["wall_s"] for t in times),
                    "all": times,
                }
    finally:
        for c in clusters.values():
            c.close()
    out["resident"] = resident_runs(s.folder, root, trees["after"], repeats)
    return out


def resident_runs(folder: Path, root: Path, code: Path, repeats: int) -> dict:
    """Keep-alive on (the default of `thermoscope analyze`): per repeat, a first run that
    finds no resident cluster (launches one and joins it) and a next run that joins it; the
    cluster is stopped after each repeat. Best of ``repeats``."""
    runs = {"first": [], "next": []}
    for r in range(repeats):
        env = {"THERMOSCOPE_KEEP_ALIVE": "60", "THERMOSCOPE_RUNTIME_DIR": str(root / f"rt{r}")}
        for which in runs:
            store = root / f"resident-{which}-{r}.zarr"
            runs[which].append(time_analyze(folder, store, code, env=env))
        stop = [sys.executable, "-m", "pipeline.cli", "--quiet", "cluster", "stop"]
        subprocess.run(stop, cwd=code, env={**code_env(code), **env}, check=True)
    return {
        which: {
            "first_layer_s": min(t["first_layer_s"] for t in times),
            "wall_s": min(t["wall_s"] for t in times),
            "all": times,
        }
        for which, times in runs.items()
    }


def format_before_after(r: dict) -> str:
    lines = [
        f"\nstart-up (1 tiny checkpoint; best of {r['repeats']}, alternating; before = "
        f"{r['base']}, after = {r['head']})",
        f"  {'cluster':10s} {'code':7s} {'first layer s':>13s} {'wall s':>8s}",
    ]
    for how in ("fresh", "running"):
        for label in ("before", "after"):
            x = r[how][label]
            lines.append(f"  {how:10s} {label:7s} {x['first_layer_s']:13.2f} {x['wall_s']:8.2f}")
    for which in ("first", "next"):
        x = r["resident"][which]
        name = f"resident, {which} run"
        lines.append(f"  {name:18s} {'after':7s} {x['first_layer_s']:5.2f} {x['wall_s']:8.2f}")
    before = r["fresh"]["before"]["first_layer_s"]
    lines.append(
        f"  to the first layer, vs fresh before: fresh after "
        f"{before / r['fresh']['after']['first_layer_s']:.2f}x faster, running cluster after "
        f"{before / r['running']['after']['first_layer_s']:.2f}x; resident (keep-alive, the "
        f"default) first run {before / r['resident']['first']['first_layer_s']:.2f}x, next run "
        f"{before / r['resident']['next']['first_layer_s']:.2f}x"
    )
    return "\n".join(lines)


MODES = {
    "startup": (
        lambda root, a: before_after(root, a.base, a.repeats, a.head),
        format_before_after,
    )
}


def _options(p) -> None:
    p.add_argument("--base", default=BASE, help="git ref of the 'before' code")
    p.add_argument("--head", default=None, help="git ref of the 'after' code (default: this tree)")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(no_startup=True)


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], MODES, setup=_options))
