"""Shared fixtures: one real local Dask cluster for the session (workers are processes)."""

from __future__ import annotations

import logging
import os
import tempfile

import pytest

# bytes read from remote series (tests/test_remote.py) are cached here, not in ~/.cache; set
# before any worker process or forkserver starts, so every worker sees it
os.environ.setdefault("THERMOSCOPE_CACHE", tempfile.mkdtemp(prefix="thermoscope-remote-"))
# no command a test runs leaves a resident cluster up (tests/test_resident.py turns it on)
os.environ["THERMOSCOPE_KEEP_ALIVE"] = "0"
os.environ["THERMOSCOPE_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="thermoscope-runtime-")


@pytest.fixture(scope="session")
def dask_cluster():
    """A real 2-worker LocalCluster; tests join it by address like an existing cluster."""
    from distributed import LocalCluster

    environ = dict(os.environ)
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster:
        # Dask's nannies write their pre-spawn environment (MALLOC_TRIM_THRESHOLD_=65536,
        # OMP_NUM_THREADS=1, ...) into this process's: restore it for the tests that follow
        os.environ.clear()
        os.environ.update(environ)
        yield cluster
