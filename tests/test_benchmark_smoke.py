"""The benchmark scripts' functions on tiny sizes (fast), plus edge cases of the window ensemble
estimator the measure stage uses (its known-answer tests are in test_ensemble.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import (
    common,
    devices,
    floor,
    incremental,
    kernel,
    optimizer,
    spectral,
    startup,
    throughput,
)
from pipeline.estimators.ensemble import window_log_var_sum

ROOT = Path(__file__).resolve().parents[1]


def test_series_raw_rate_and_fit(tmp_path):
    s = common.Series(tmp_path / "s", 0.05, "bf16")
    files = s.extend(3)
    assert len(files) == 3 and all(f.stat().st_size > 0 for f in files)
    from safetensors.torch import load_file

    a, b = load_file(files[0]), load_file(files[1])
    assert (
        set(a) == set(common.layer_shapes(0.05 * common.MB, 2))
        and a["layers.0.mlp.up.weight"].dtype == torch.bfloat16
    )
    step = (b["layers.0.mlp.up.weight"].float() - a["layers.0.mlp.up.weight"].float()).std().item()
    assert step == pytest.approx(
        1e-3, rel=0.2
    )  # the random walk's step (bf16 rounding adds a little)
    raw = common.raw_read_rate(files, buffers=(4096, 65536), repeats=1)
    assert raw["bytes"] == sum(f.stat().st_size for f in files) and raw["raw_bytes_per_s"] > 0
    assert (
        raw["raw_bytes_per_s"] == max(raw["raw_by_buffer"].values())
        and len(raw["raw_by_buffer"]) == 2
    )
    fit = common.linear_fit([1, 2, 3], [3.0, 5.0, 7.0])
    assert (
        fit["slope"] == pytest.approx(2.0)
        and fit["intercept"] == pytest.approx(1.0)
        and fit["r2"] == pytest.approx(1.0)
    )
    e, r = spectral.ww_formulas(np.diag([3.0, 4.0]))
    p = np.array([9.0, 16.0]) / 25
    assert e == pytest.approx(-(p * np.log(p)).sum() / math.log(2)) and r == pytest.approx(25 / 16)


def test_run_analyze_measures_wall_time_and_tree_memory(tmp_path):
    s = common.Series(tmp_path / "s", 0.05)
    s.extend(1)
    r = common.run_analyze(s.folder, tmp_path / "o.zarr", tmp_path / "c", workers=1)
    assert r["wall_s"] > 0 and (tmp_path / "o.zarr").exists()
    assert r["peak_anon_bytes"] > 10 * common.MB  # python + torch + dask really ran in the tree
    assert "analyze" in r["command"]


@pytest.mark.slow  # two analyze subprocesses: ~30 s, more on a loaded machine
def test_throughput_fields_on_a_tiny_series(tmp_path):
    out = throughput.throughput(tmp_path, 0.05, 2, "fp32", spectral=False, workers=1)
    for key in ("raw_bytes_per_s", "bytes", "n_params"):
        assert out[key] > 0
    d = out["default"]
    for key in (
        "wall_s",
        "bytes_per_s",
        "ratio",
        "marginal_bytes_per_s",
        "peak_anon_bytes",
        "wall_s_first_half",
    ):
        assert key in d and np.isfinite(d[key])
    assert d["peak_anon_bytes"] > 10 * common.MB  # python + torch + dask really ran in the tree
    assert "throughput" in throughput.format_throughput(out)


@pytest.mark.slow  # three analyze subprocesses, or three dvc repro of four stages each
@pytest.mark.parametrize("via", ["analyze", "dvc"])
def test_incremental_reuses_the_cache_and_reports_net_ratios(tmp_path, via):
    out = incremental.incremental(tmp_path, 0.05, n=3, workers=1, via=via)
    assert out["rerun_wall_s"] > 0 and out["startup_s"] > 0
    net_share = (out["full_wall_s"] - out["startup_s"]) / 3
    assert out["net_rerun_over_net_share"] == pytest.approx(
        (out["rerun_wall_s"] - out["startup_s"]) / net_share
    )
    assert "net of the start-up" in incremental.format_incremental(out)


def test_window_log_var_sum_frozen_coordinates_and_too_few():
    steps = np.arange(10.0)
    theta = np.zeros((10, 4), np.float32)
    theta[:, 1] = 0.5
    theta[:, 2] = 3.0 + 0.25 * steps  # exactly linear: frozen
    theta[:, 3] = np.random.default_rng(3).normal(0, 0.1, 10)
    got = window_log_var_sum([torch.from_numpy(r.copy()) for r in theta], steps)
    resid = theta[:, 3] - np.polyval(np.polyfit(steps, theta[:, 3].astype(float), 1), steps)
    assert got == pytest.approx(math.log((resid**2).sum() / 8), rel=1e-5)
    with pytest.raises(ValueError):
        window_log_var_sum([torch.ones(3), torch.ones(3)], [0, 1])


@pytest.mark.slow  # two analyze subprocesses
@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="on a GPU machine benchmarks/gpu_check.sh runs the real comparison",
)
def test_devices_mode_times_cpu_and_reports_a_missing_gpu_in_one_line(tmp_path):
    out = devices.devices(tmp_path, 0.05, 2, workers=1)
    assert out["runs"]["cpu"]["wall_s"] > 0 and out["gpu"] is None
    assert "no CUDA device is visible" in out["runs"]["cuda"]["error"]
    table = devices.format_devices(out)
    assert "cuda" in table and "failed:" in table


def test_floor_mode_times_the_kernel_parts_and_the_resume_cost(tmp_path):
    out = floor.floor(tmp_path, 0.5, 9)
    kernels = out["kernels"]
    assert {
        "read (cache slices)",
        "read + sum, sumsq, increment, lag dots",
        "measure_block (default metrics)",
        "measure_block, one per core at once",
    } <= set(kernels)
    assert all(k["seconds"] > 0 and k["ratio"] > 0 for k in kernels.values())
    # measure_block does the reads and far more: it cannot be faster than the reads alone
    assert (
        kernels["measure_block (default metrics)"]["seconds"]
        > kernels["read (cache slices)"]["seconds"]
    )
    # a resumed task reads max_lag = 8 earlier checkpoints besides the new one
    assert out["rerun_over_share"] > 1.0
    assert out["needed_per_core_ratio"] == pytest.approx(0.5 / out["cores"])
    assert "floor" in floor.format_floor(out)


@pytest.mark.parametrize(
    "script",
    ["throughput", "incremental", "spectral", "devices", "floor", "kernel", "startup", "optimizer"],
)
def test_each_benchmark_script_runs_from_the_command_line(script):
    """`python benchmarks/<script>.py --help`: the script finds its shared helpers when run as
    a file from any directory (not only as ``benchmarks.<script>``)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--help"],
        capture_output=True,
        text=True,
        cwd="/",
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert done.returncode == 0, done.stderr
    assert "--mode" in done.stdout and "--json" in done.stdout


@pytest.mark.slow  # two analyze subprocesses
def test_kernel_before_after_times_both_trees_and_compares_their_stores(tmp_path):
    """The same code as "before" (HEAD) and "after" (this checkout): both children time the
    kernel on the same files, and the two stores agree (this checkout may carry uncommitted
    changes, so equal to fp32 rounding rather than bit-equal)."""
    out = kernel.before_after(tmp_path, 0.5, 9, base="HEAD", repeats=2)
    for label in ("before", "after"):
        run = out["runs"][label]
        assert run["blocks_s"] > 0 and run["finalize_s"] > 0 and len(run["all"]) == 2
    assert out["speedup"] > 0 and out["variables"] > 10
    assert out["largest_difference"] < 1e-5
    assert "speedup" in kernel.format_kernel(out)


def test_startup_times_the_first_layer_and_the_exit(tmp_path):
    """One `thermoscope analyze` of the tiny series: the first layer lands after launch and
    before the command exits (the progress line is found on stderr)."""
    s = common.tiny_series(tmp_path)
    r = startup.time_analyze(s.folder, tmp_path / "s.zarr", common.REPO)
    assert 0 < r["first_layer_s"] < r["wall_s"] and (tmp_path / "s.zarr").exists()


@pytest.mark.slow  # two running clusters and eight analyze subprocesses
def test_startup_before_after_on_fresh_and_running_clusters(tmp_path):
    out = startup.before_after(tmp_path, base="HEAD", repeats=1)
    for how in ("fresh", "running"):
        for label in ("before", "after"):
            x = out[how][label]
            assert 0 < x["first_layer_s"] < x["wall_s"]
    assert "running cluster" in startup.format_before_after(out)


@pytest.mark.slow  # an AdamW series and three analyze subprocesses
def test_optimizer_row_reads_the_state_and_times_both(tmp_path):
    out = optimizer.with_and_without(tmp_path, 2, 5, repeats=1, workers=1)
    assert out["precond_values"] > 0  # the with-state run measured the preconditioned band
    assert out["state_bytes"] > out["model_bytes"] > 0 and out["ratio"] > 0
    assert "optimizer state" in optimizer.format_optimizer(out)
