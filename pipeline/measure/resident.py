"""A local cluster that outlives one command, so the next run joins it instead of starting one.

Starting a local cluster costs each run its worker processes' imports (torch, Dask: ~1 s on
the critical path even when forked from a preloaded server, ``forkserver``); joining a running
one costs a connection (~0.3 s from launch to the first task). With ``dask.keep_alive_s`` > 0
(default 300) a run that would start a local cluster of worker processes instead looks for a
resident cluster started by an earlier run with the same key; when there is none it launches
one (``serve``: a detached process that runs the same ``LocalCluster`` the run would have
started, forked workers included) and joins it. The resident closes after ``keep_alive_s``
seconds with no client connected and no task held, and the process exits with it;
``thermoscope cluster stop`` closes it at once. A run that cannot join (it never started, or
it closed in between) starts its own local cluster as without keep-alive.

The key covers what a worker runs and how: this interpreter, the source of every file of the
``pipeline`` package (an edited or upgraded tree never joins workers running older code),
the cluster settings and the variables that choose devices and threads. State lives in
``$THERMOSCOPE_RUNTIME_DIR`` (default ``$XDG_RUNTIME_DIR/thermoscope`` or
``~/.cache/thermoscope/clusters``, kept 0700): ``<key>.json`` (pid, address once ready, and
the cluster's TLS certificate and key) and ``<key>.log``. Unlike a plain local Dask cluster,
which accepts any local connection (and so runs any local user's code) while it lives, a
resident one lives for minutes, so it speaks TLS only (a self-signed certificate made at its
start, ``Security.temporary``): only a client holding the certificate, i.e. this user,
joins. Not used for thread workers, when joining a given scheduler, or where CUDA is visible
(GPU workers: untested here). Light: stdlib only until a cluster is started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.atomic import process_alive, write_text
from pipeline.core.code import PACKAGE_DIR

if TYPE_CHECKING:
    from pipeline.settings import ClusterSettings

READY_TIMEOUT_S = 60.0  # a resident that is not ready by then is given up (a local one starts)
_launched: list[subprocess.Popen] = []
_ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "THERMOSCOPE_CACHE")


def runtime_dir() -> Path:
    """Where resident clusters leave their state files and logs (created private, 0700)."""
    base = os.environ.get("THERMOSCOPE_RUNTIME_DIR")
    if not base:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = Path(xdg) / "thermoscope" if xdg else Path.home() / ".cache/thermoscope/clusters"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)  # the state files hold the clusters' TLS keys: this user's only
    return path


def cluster_key(settings: ClusterSettings) -> str:
    """Hex digest of what a resident cluster's workers run and how (see the module text)."""
    h = hashlib.sha256()
    h.update(sys.executable.encode())
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE_DIR)).encode())
        h.update(path.read_bytes())
    fields = dataclasses.asdict(settings)
    fields.pop("keep_alive_s", None)  # how long it stays up does not change what it runs
    h.update(json.dumps(fields, sort_keys=True).encode())
    h.update(json.dumps({k: os.environ.get(k) for k in _ENV_KEYS}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def uses_resident(settings: ClusterSettings) -> bool:
    """True when this run should join (or launch) a resident cluster: it would start local
    worker processes, keep-alive is on, and no CUDA device is visible."""
    from pipeline.measure.forkserver import cuda_visible

    return settings.forks_local_workers and settings.keep_alive > 0 and not cuda_visible()


def launch(settings: ClusterSettings) -> Path:
    """Make sure a resident cluster for ``settings`` runs or is starting; return its state
    file. Returns at once: ``ready`` waits for it. Under a file lock, so two runs started
    together launch one."""
    key = cluster_key(settings)
    state = runtime_dir() / f"{key}.json"
    with _locked(state.with_suffix(".lock")):
        if _alive(_read(state).get("pid")):
            return state
        log = state.with_suffix(".log").open("ab")
        cmd = [sys.executable, "-m", "pipeline.measure.resident", str(state)]
        cmd.append(json.dumps(dataclasses.asdict(settings)))
        env = {**os.environ, "PYTHONPATH": _pythonpath()}
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            start_new_session=True,  # not in this terminal's process group: outlives it
        )  # fmt: skip
        log.close()
        _launched.append(proc)  # held: no "still running" warning when this process exits
        _write(state, {"pid": proc.pid, "address": None, "key": key})
        logging.getLogger(__name__).warning(
            "starting a local Dask cluster that stays up %.0f s after the last run leaves it, "
            "for the next one (dask.keep_alive_s; stop it with `thermoscope cluster stop`)",
            settings.keep_alive,
        )
    return state


def ready(settings: ClusterSettings) -> dict | None:
    """The state of the resident cluster for ``settings`` (launched when none runs: its
    address and TLS credentials) once it accepts clients; None when it could not be started
    (the caller then starts a local cluster as without keep-alive; the reason is in its log)."""
    state = launch(settings)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        info = _read(state)
        if info.get("address"):
            return info
        if not _alive(info.get("pid")):
            break
        time.sleep(0.02)
    logging.getLogger(__name__).warning(
        "the resident Dask cluster did not start (see %s): starting a local one",
        state.with_suffix(".log"),
    )
    return None


def client(settings: ClusterSettings):
    """A ``distributed.Client`` of the resident cluster for ``settings`` (launched when none
    runs), or None when there is none to join: the caller starts a local cluster."""
    from distributed import Client

    info = ready(settings)
    if info is None:
        return None
    try:
        return Client(info["address"], timeout="10s", security=_client_security(info))
    except (OSError, TimeoutError) as exc:  # closed between reading its address and now
        logging.getLogger(__name__).warning("could not join the resident cluster (%s)", exc)
        return None


def stop_all() -> int:
    """Close every resident cluster of this user (``thermoscope cluster stop``); the count."""
    from distributed import Client

    stopped = 0
    for state in runtime_dir().glob("*.json"):
        info = _read(state)
        if info.get("address") and _alive(info.get("pid")):
            with contextlib.suppress(OSError, TimeoutError):
                security = _client_security(info)
                with Client(info["address"], timeout="5s", security=security) as client:
                    client.shutdown()
                stopped += 1
        state.unlink(missing_ok=True)
    return stopped


def serve(state: Path, settings: ClusterSettings) -> None:
    """The resident process: start the local cluster ``settings`` describe, publish its address
    in ``state``, and close it once no client has been connected and no task held for
    ``keep_alive`` seconds (or when ``thermoscope cluster stop`` shuts it down). Idle means no
    client as well as no work, so a run that has joined is never closed under."""
    from distributed.security import Security

    from pipeline.measure import forkserver
    from pipeline.measure.parallel import local_cluster

    forkserver.start()
    security = Security.temporary()  # a fresh self-signed certificate and key, in memory
    cluster = local_cluster(settings, security)
    tls = {"cert": security.tls_ca_file, "tls_key": security.tls_client_key}
    info = {"pid": os.getpid(), "address": cluster.scheduler_address, "key": state.stem, **tls}
    _write(state, info)
    scheduler, idle_since = cluster.scheduler, time.monotonic()
    try:
        while scheduler.status.name not in ("closing", "closed"):
            time.sleep(0.5)
            if _in_use(scheduler):
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > settings.keep_alive:
                state.unlink(missing_ok=True)  # no new run joins from here on
                time.sleep(1.0)  # one that read the address just before may be connecting
                if not _in_use(scheduler):
                    with contextlib.suppress(Exception):
                        cluster.close(timeout=5)
                    break
                _write(state, info)  # it did: serve on
    finally:
        if _read(state).get("pid") == os.getpid():
            state.unlink(missing_ok=True)
        for child in multiprocessing.active_children():  # worker processes still up, if any
            child.terminate()
        os._exit(0)  # Dask's own teardown would wait ~15 s for a scheduler already gone


def _in_use(scheduler) -> bool:
    """A client is connected (besides the scheduler's own fire-and-forget one) or tasks are
    held. Read from this thread while the scheduler runs in its loop's: two sizes, no state."""
    return len(scheduler.clients) > 1 or len(scheduler.tasks) > 0


def _client_security(info: dict):
    """TLS credentials of a client of the resident cluster whose state is ``info``: its
    certificate, which only this user can read (the state file is in a 0700 folder); none for
    a resident of an earlier version (plain TCP, no certificate in its state)."""
    from distributed.security import Security

    if not info.get("cert"):
        return Security()
    return Security(
        tls_ca_file=info.get("cert"),
        tls_client_cert=info.get("cert"),
        tls_client_key=info.get("tls_key"),
        require_encryption=True,
    )


def _pythonpath() -> str:
    """The caller's PYTHONPATH with this ``pipeline`` package's parent first, so the resident
    process imports the same tree whatever its working directory."""
    parts = [str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def _alive(pid) -> bool:
    return isinstance(pid, int) and process_alive(pid)


def _read(state: Path) -> dict:
    try:
        return json.loads(state.read_text())
    except (OSError, ValueError):
        return {}


def _write(state: Path, info: dict) -> None:
    """Atomic: a reader sees the old content or the new, never half of it."""
    write_text(state, json.dumps(info))


@contextlib.contextmanager
def _locked(path: Path):
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


if __name__ == "__main__":  # python -m pipeline.measure.resident STATE SETTINGS_JSON
    from pipeline.settings import ClusterSettings

    serve(Path(sys.argv[1]), ClusterSettings(**json.loads(sys.argv[2])))
