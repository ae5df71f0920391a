"""End to end through the real components: safetensors files -> Dask cluster -> Zarr store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr
from checkpoint_factory import NATURAL_ORDER, write_flat

from pipeline.analyze import analyze
from pipeline.settings import ClusterSettings, MeasureSettings

SETTINGS = MeasureSettings(max_lag=4, entropy_sample=4096, ensemble_window=4, block_elems=16)
LOCAL = ClusterSettings(n_workers=2, processes=True)  # worker processes, as on large series


def _run_node(store) -> xr.Dataset:
    tree = xr.open_datatree(store, engine="zarr")
    (name,) = list(tree.children)
    return tree[name].to_dataset()


def test_analyze_flat_folder_outside_repo_on_two_worker_cluster(tmp_path):
    write_flat(tmp_path / "run", range(0, 100, 10))
    store = analyze(tmp_path / "run", tmp_path / "out.zarr", SETTINGS, LOCAL)
    ds = _run_node(store)
    assert list(ds.layer.values) == NATURAL_ORDER
    assert list(ds.step.values) == list(range(0, 100, 10))
    for name, var in ds.data_vars.items():
        assert var.attrs.get("units") and var.attrs.get("long_name"), name
    # the band is exact: recompute one entry straight from the files
    from safetensors.torch import load_file

    a = load_file(tmp_path / "run/step_000090.safetensors")["layers.2.weight"]
    b = load_file(tmp_path / "run/step_000070.safetensors")["layers.2.weight"]
    got = ds.sq_distance.sel(step=90, layer="layers.2.weight", lag=2).item()
    assert got == pytest.approx(float(((a - b) ** 2).sum()), rel=1e-6)
    rms = float(a.square().mean().sqrt())
    assert ds.weight_rms.sel(step=90, layer="layers.2.weight").item() == pytest.approx(
        rms, rel=1e-6
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def external_cluster():
    """A real scheduler and two workers started as separate processes."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-dashboard",
        ],
        stderr=subprocess.DEVNULL,
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_worker",
            address,
            "--nworkers",
            "2",
            "--nthreads",
            "1",
            "--no-dashboard",
        ],
        stderr=subprocess.DEVNULL,
    )
    from distributed import Client

    deadline = time.time() + 60
    while True:
        try:
            with Client(address, timeout=5) as c:
                if len(c.scheduler_info()["workers"]) == 2:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError("external cluster did not start")
        time.sleep(0.5)
    yield address
    worker.terminate()
    scheduler.terminate()
    worker.wait(30)
    scheduler.wait(30)


def test_external_scheduler_gives_identical_results(tmp_path, external_cluster, monkeypatch):
    write_flat(tmp_path / "run", range(0, 60, 5))
    local = _run_node(analyze(tmp_path / "run", tmp_path / "local.zarr", SETTINGS, LOCAL))
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", external_cluster)
    remote = _run_node(
        analyze(
            tmp_path / "run",
            tmp_path / "remote.zarr",
            SETTINGS,
            ClusterSettings(),
            cache_dir=tmp_path / "other-cache",
        )
    )
    xr.testing.assert_identical(local.drop_attrs(), remote.drop_attrs())


def _scramble_data_keep_mtime(path: Path) -> None:
    """Overwrite a file's tensor bytes with NaN patterns, keeping header, size and mtime."""
    st = path.stat()
    raw = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    raw[header_end:] = b"\xff" * (len(raw) - header_end)
    path.write_bytes(raw)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_adding_checkpoints_measures_only_new_ones_and_matches_full_run(tmp_path, dask_cluster):
    shared = ClusterSettings(scheduler_address=dask_cluster.scheduler_address)
    old_steps, new_steps = range(0, 80, 10), range(80, 130, 10)
    write_flat(tmp_path / "pristine", list(old_steps) + list(new_steps))
    write_flat(tmp_path / "run", old_steps)
    cache = tmp_path / "cache"
    analyze(tmp_path / "run", tmp_path / "a.zarr", SETTINGS, shared, cache_dir=cache)
    write_flat(tmp_path / "run", new_steps)
    # checkpoints 0..3 are neither in the lag buffer (max_lag 4) nor in the open ensemble
    # window of the resumed run: if it read them, it would see NaNs
    for step in range(0, 40, 10):
        _scramble_data_keep_mtime(tmp_path / f"run/step_{step:06d}.safetensors")
    incremental = _run_node(
        analyze(tmp_path / "run", tmp_path / "b.zarr", SETTINGS, shared, cache_dir=cache)
    )
    full = _run_node(
        analyze(
            tmp_path / "pristine",
            tmp_path / "c.zarr",
            SETTINGS,
            shared,
            cache_dir=tmp_path / "fresh",
        )
    )
    assert int(incremental.nonfinite_count.sum()) == 0
    # the resumed band starts from a direct fp32 sum where the full run continues its increment
    # recursion (METHODS.md, measurement primitive): equal to fp32 precision
    xr.testing.assert_allclose(incremental.drop_attrs(), full.drop_attrs(), rtol=1e-5)
    assert incremental.sizes["step"] == 13


def _worker_state():
    import os
    import sys

    import torch

    return {
        "malloc": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "parent": os.getppid(),
        "torch": "torch" in sys.modules,
    }


def test_worker_processes_fork_from_the_preloaded_server(monkeypatch):
    """Workers are children of the forkserver (torch imported there once) and carry the worker
    environment it was started with: malloc settings and one OpenMP thread. Whatever an earlier
    cluster left in this process's environment (Dask's nanny writes its defaults there, and
    prefers them to its config), and without leaking ours into it."""
    from pipeline.measure.forkserver import WORKER_MALLOC
    from pipeline.measure.parallel import dask_client

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # a default Dask cluster's leftover
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with dask_client(ClusterSettings(n_workers=2, processes=True)) as client:
        states = list(client.run(_worker_state).values())
    assert len(states) == 2 and states[0]["parent"] == states[1]["parent"] != os.getpid()
    server = Path(f"/proc/{states[0]['parent']}/cmdline").read_bytes()
    assert b"multiprocessing.forkserver" in server and b"torch" in server  # preloaded there
    for state in states:
        assert state["malloc"] == WORKER_MALLOC["MALLOC_TRIM_THRESHOLD_"]
        assert state["omp"] == "1" and state["torch_threads"] == 1
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536" and "OMP_NUM_THREADS" not in os.environ


def _proc(pid: int, name: str) -> bytes:
    """/proc/PID/NAME once the freshly spawned process has exec'd (empty until then)."""
    deadline = time.monotonic() + 30
    while not (data := Path(f"/proc/{pid}/{name}").read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return data


def _server_environ(pid: int) -> dict[str, str]:
    raw = _proc(pid, "environ").split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_forkserver_started_elsewhere_first_is_replaced_by_ours():
    """A forkserver someone else launched first (no preload, this process's environment) and
    serving no process is replaced by ``start``: the server workers fork from has imported
    torch and holds the worker malloc settings, which glibc reads only when a process starts."""
    import multiprocessing.forkserver

    from pipeline.measure import forkserver

    server = multiprocessing.forkserver._forkserver
    server._stop()
    server.set_forkserver_preload([])
    server.ensure_running()  # as a pool or DataLoader would, before thermoscope
    foreign = server._forkserver_pid
    assert b"multiprocessing.forkserver" in _proc(foreign, "cmdline")
    assert b"torch" not in _proc(foreign, "cmdline")
    forkserver.start()
    ours = server._forkserver_pid
    assert ours != foreign and not Path(f"/proc/{foreign}").exists()
    assert b"torch" in _proc(ours, "cmdline")
    environ = _server_environ(ours)
    assert {k: environ.get(k) for k in forkserver.WORKER_ENV} == forkserver.WORKER_ENV
    forkserver.start()
    assert server._forkserver_pid == ours  # ours is kept


def test_thread_workers_run_torch_single_threaded():
    import torch

    from pipeline.measure.parallel import dask_client

    before = torch.get_num_threads()
    with dask_client(ClusterSettings(n_workers=2, processes=False)) as client:
        assert client.submit(_worker_state, pure=False).result()["torch_threads"] == 1
    assert torch.get_num_threads() == before
