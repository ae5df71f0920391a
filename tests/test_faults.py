"""Faults of a real run: results already written survive, interrupted work resumes.

A previous store and report stay byte-identical (every file hashed) through a run that fails on
bad input and through a run killed with SIGKILL (the whole process group, Dask workers included)
while it measures a real series; leftovers of killed runs do not break the next run, which
reuses the layers the killed one finished and gives exactly the store of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import checkpoint_factory as cf
import pytest
import torch
import xarray as xr

REPO = Path(__file__).resolve().parents[1]
N_LAYERS, SIDE, N_CHECKPOINTS = (
    6,
    384,
    20,
)  # 6 x 147k-param layers: measure phase of several seconds
PARAMS = "measure:\n  max_lag: 4\n  entropy_sample: 4096\n  ensemble_window: 4\n"


def command(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *map(str, args)]


def thermoscope(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (folders implied)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_big_series(run: Path) -> None:
    """A real random-walk series: N_LAYERS square F32 layers, N_CHECKPOINTS checkpoints."""
    g = torch.Generator().manual_seed(5)
    weights = {f"blocks.{i}.weight": torch.randn(SIDE, SIDE, generator=g) for i in range(N_LAYERS)}
    for k in range(N_CHECKPOINTS):
        weights = {n: w + 0.02 * torch.randn(SIDE, SIDE, generator=g) for n, w in weights.items()}
        cf.write_file(run / f"step_{100 * k:06d}.safetensors", weights)


def cached_layers(cache: Path, run_name: str) -> list[Path]:
    """Finished layer files of ``run_name`` in a measurement cache (temp files excluded)."""
    return [p for p in cache.glob(f"*/{run_name}/*.npz") if ".tmp" not in p.name]


def json_events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines()]  # fails on any non-JSON line


def kill_when_measuring(args, cache: Path, run_name: str, timeout: float = 180) -> int:
    """Start ``thermoscope ARGS`` in its own session, wait until it has cached its first
    measured layer, then SIGKILL its whole process group. Returns the layers cached by then."""
    proc = subprocess.Popen(
        command(*args),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while not cached_layers(cache, run_name):
            if proc.poll() is not None:
                pytest.fail(
                    f"run ended (rc {proc.returncode}) before it was killed: {proc.stderr.read()}"
                )
            if time.monotonic() > deadline:
                pytest.fail("no layer measured in time")
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    while group_members(proc.pid):  # Dask nanny and worker processes die with it
        assert time.monotonic() < deadline, group_members(proc.pid)
        time.sleep(0.05)
    return len(cached_layers(cache, run_name))


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def test_failed_and_killed_runs_keep_previous_results_and_resume(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    store, report, cache = tmp_path / "out.zarr", tmp_path / "report", tmp_path / ".out.zarr.cache"
    write_big_series(tmp_path / "big")

    # an uninterrupted run (own cache) is the reference; a copy of its store is the previous
    # result at the path the next runs write to, with its report
    reference = tmp_path / "reference.zarr"
    ref = thermoscope(
        "analyze",
        tmp_path / "big",
        "--store",
        reference,
        "--params",
        params,
        "--workers",
        "1",
        "--cache",
        tmp_path / "fresh_cache",
        "--quiet",
    )
    assert ref.returncode == 0, ref.stderr
    shutil.copytree(reference, store)
    assert thermoscope("report", store, "--out", report, "--quiet").returncode == 0
    previous = {"store": tree_hashes(store), "report": tree_hashes(report)}
    assert len(previous["store"]) > 5 and "index.html" in previous["report"]
    store_inode = store.stat().st_ino

    def unchanged():
        assert tree_hashes(store) == previous["store"]
        assert tree_hashes(report) == previous["report"]
        assert store.stat().st_ino == store_inode

    # (a) a run that fails on bad input
    cf.write_flat(tmp_path / "bad", [1, 2])
    cut = tmp_path / "bad" / "step_000002.safetensors"
    cut.write_bytes(cut.read_bytes()[:-10])
    failed = thermoscope("analyze", tmp_path / "bad", "--store", store)
    assert failed.returncode == 2 and str(cut) in failed.stderr
    unchanged()

    # (b) a run killed with SIGKILL mid-measure
    analyze_big = (
        "--json-log",
        "analyze",
        tmp_path / "big",
        "--store",
        store,
        "--params",
        params,
        "--workers",
        "1",
    )
    n_cached = kill_when_measuring(analyze_big, cache, "big")
    assert 1 <= n_cached < N_LAYERS, n_cached  # killed mid-measure: some layers done, some not
    unchanged()

    # what a kill at another moment leaves: a half-written temp store, a temp cache file
    shutil.copytree(store, tmp_path / ".out.zarr.tmp-deadbeef")
    shutil.rmtree(tmp_path / ".out.zarr.tmp-deadbeef" / "big")
    some_layer = cached_layers(cache, "big")[0]
    some_layer.with_suffix(".tmp99999.npz").write_bytes(some_layer.read_bytes()[:100])

    # the rerun completes, measuring only the layers the killed run had not finished ...
    rerun = thermoscope(*analyze_big)
    assert rerun.returncode == 0, rerun.stderr
    events = json_events(rerun.stderr)
    measured = {e["what"] for e in events if e["event"] == "progress" and e["done"] > 0}
    assert len(measured) == N_LAYERS - n_cached, measured
    assert events[-1]["event"] == "done" and events[-1]["store"] == str(store)
    assert store.stat().st_ino != store_inode  # a new store was swapped in
    assert tree_hashes(report) == previous["report"]
    assert len(cached_layers(cache, "big")) == N_LAYERS

    # ... and gives exactly the store of the uninterrupted run
    got = xr.open_datatree(store, engine="zarr")
    want = xr.open_datatree(reference, engine="zarr")
    assert [n.path for n in got.subtree] == [n.path for n in want.subtree] == ["/", "/big"]
    assert dict(got.attrs) == dict(want.attrs)
    for node in want.subtree:
        xr.testing.assert_identical(
            got[node.path].to_dataset(inherit=False).load(), node.to_dataset(inherit=False).load()
        )
