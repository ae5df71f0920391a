"""The resident local cluster (pipeline/measure/resident.py): real ``thermoscope analyze``
subprocesses, a real detached Dask cluster, real stores.

A run with keep-alive on launches the resident cluster and joins it; the next run joins the
same process (no new one) and writes the same store as a run with keep-alive off; ``cluster
stop`` and the idle timeout each end it (and its worker processes), but never while a client
is connected; settings or code that differ give another key, so a run never joins workers
that run other code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import checkpoint_factory as cf
import pytest

from pipeline.measure import resident
from pipeline.settings import ClusterSettings
from pipeline.store.zarr_io import open_tree
from pipeline.testing.compare import largest_differences

REPO = Path(__file__).resolve().parents[1]


def _run(env: dict, *args) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--quiet", *map(str, args)],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _state(runtime: Path) -> dict:
    (state,) = runtime.glob("*.json")
    return json.loads(state.read_text())


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not resident._alive(pid):
            return True
        time.sleep(0.1)
    return False


def _descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (its workers, the forkserver), from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += map(int, children)
        todo += map(int, children)
    return out


@pytest.fixture
def series(tmp_path) -> Path:
    folder = tmp_path / "run"
    cf.write_flat(folder, range(0, 120, 10))
    return folder


def test_the_next_run_joins_the_resident_cluster_and_writes_the_same_store(series, tmp_path):
    runtime = tmp_path / "runtime"
    on = {"THERMOSCOPE_KEEP_ALIVE": "60", "THERMOSCOPE_RUNTIME_DIR": str(runtime)}
    _run({"THERMOSCOPE_KEEP_ALIVE": "0"}, "analyze", series, "--store", tmp_path / "off.zarr")
    assert not runtime.exists()  # keep-alive off: nothing resident
    _run(on, "analyze", series, "--store", tmp_path / "first.zarr")
    first = _state(runtime)
    assert first["address"].startswith("tls://127.0.0.1:") and resident._alive(first["pid"])
    workers = _descendants(first["pid"])
    try:
        _run(on, "analyze", series, "--store", tmp_path / "next.zarr", "--cache", tmp_path / "c")
        assert _state(runtime) == first  # joined: the same process, no second one
        reference = open_tree(tmp_path / "off.zarr")
        for name in ("first", "next"):
            diffs = largest_differences(open_tree(tmp_path / f"{name}.zarr"), reference)
            assert max(d for d in diffs.values() if d == d) == 0.0, name
    finally:
        stopped = _run(on, "cluster", "stop")
    assert stopped.returncode == 0
    assert _gone(first["pid"], within=10)
    assert all(_gone(p, within=10) for p in workers)  # no worker outlives it
    assert not list(runtime.glob("*.json"))


def test_the_resident_cluster_closes_itself_when_idle(series, tmp_path):
    runtime = tmp_path / "runtime"
    env = {"THERMOSCOPE_KEEP_ALIVE": "2", "THERMOSCOPE_RUNTIME_DIR": str(runtime)}
    _run(env, "analyze", series, "--store", tmp_path / "a.zarr")
    pid = _state(runtime)["pid"]
    assert _gone(pid, within=30)
    assert not list(runtime.glob("*.json"))


def test_the_key_separates_settings_and_code_but_not_the_keep_alive(tmp_path, monkeypatch):
    base = ClusterSettings()
    assert resident.cluster_key(base) == resident.cluster_key(ClusterSettings())
    assert resident.cluster_key(base) == resident.cluster_key(
        dataclasses.replace(base, keep_alive_s=5)
    )
    assert resident.cluster_key(base) != resident.cluster_key(
        dataclasses.replace(base, n_workers=1)
    )
    tree = tmp_path / "pipeline"
    tree.mkdir()
    (tree / "kernel.py").write_text("x = 1\n")
    monkeypatch.setattr(resident, "PACKAGE_DIR", tree)
    before = resident.cluster_key(base)
    (tree / "kernel.py").write_text("x = 2\n")  # an edited tree: other workers
    assert resident.cluster_key(base) != before


def test_keep_alive_is_off_for_thread_workers_and_given_schedulers(monkeypatch):
    monkeypatch.setenv("THERMOSCOPE_KEEP_ALIVE", "60")
    assert resident.uses_resident(ClusterSettings())
    assert not resident.uses_resident(ClusterSettings(processes=False))
    assert not resident.uses_resident(ClusterSettings(scheduler_address="tcp://127.0.0.1:1"))
    monkeypatch.setenv("THERMOSCOPE_KEEP_ALIVE", "0")
    assert not resident.uses_resident(ClusterSettings(keep_alive_s=60))  # the harness wins


def test_a_joined_client_is_never_closed_under(tmp_path, monkeypatch):
    """Keep-alive 1 s, a client joined and silent for 3 s: the resident stays (idle means no
    client as well as no work), runs the client's task, and closes once the client leaves."""
    monkeypatch.setenv("THERMOSCOPE_KEEP_ALIVE", "1")
    monkeypatch.setenv("THERMOSCOPE_RUNTIME_DIR", str(tmp_path))
    settings = ClusterSettings(n_workers=1)
    client = resident.client(settings)
    assert client is not None
    pid = _state(tmp_path)["pid"]
    with client:
        time.sleep(3.0)
        assert client.submit(sum, [1, 2]).result(timeout=30) == 3
    assert _gone(pid, within=30)


def test_only_a_client_with_the_certificate_joins(tmp_path, monkeypatch):
    """The resident cluster speaks TLS with a certificate made at its start and kept in this
    user's 0700 runtime folder: a client without it (another local user) cannot connect, one
    with it can."""
    from distributed import Client
    from distributed.security import Security

    monkeypatch.setenv("THERMOSCOPE_KEEP_ALIVE", "30")
    monkeypatch.setenv("THERMOSCOPE_RUNTIME_DIR", str(tmp_path / "runtime"))
    settings = ClusterSettings(n_workers=1)
    info = resident.ready(settings)
    try:
        assert (tmp_path / "runtime").stat().st_mode & 0o777 == 0o700
        with pytest.raises((OSError, TimeoutError)):
            Client(info["address"].replace("tls://", "tcp://"), timeout="3s")
        stranger = Security.temporary()  # TLS with a certificate of its own
        with pytest.raises((OSError, TimeoutError)):
            Client(info["address"], timeout="3s", security=stranger)
        with Client(info["address"], timeout="10s", security=resident._client_security(info)):
            pass
    finally:
        assert resident.stop_all() == 1
    assert _gone(info["pid"], within=15)
