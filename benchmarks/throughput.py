"""Throughput, memory and scaling of `thermoscope analyze` against the raw read rate of the same files.

Usage (see benchmarks/README.md):
    python benchmarks/throughput.py --size 512 --checkpoints 8 [--dtype bf16|fp32] [--spectral]
           [--workers W] [--mode throughput|memory|scaling|incremental|big|spectral|devices|floor|all] [--json]

Every figure is measured in the same run on the same files: a synthetic random-walk series of
transformer-shaped layers is written (``--dir`` or a temp dir, removed afterwards), the raw
sequential read rate is timed on those files with a warm page cache (read once, then timed
``readinto`` into one reused buffer), and ``thermoscope analyze`` runs as a subprocess while a
sampler sums ``RssAnon`` (anonymous resident memory: mmap'd / page-cache file pages excluded)
of the process and all its descendants every ~50 ms.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DTYPES = {"fp32": ("F32", torch.float32, 4), "bf16": ("BF16", torch.bfloat16, 2)}
MB = 1 << 20


# ---------------------------------------------------------------------------- synthetic series
def layer_shapes(size_bytes: float, itemsize: int, n_blocks: int = 2) -> dict[str, tuple]:
    """Transformer-like layers (qkv, out, mlp up/down, two norms per block) of about
    ``size_bytes`` in total; hidden size d a multiple of 64 (at least 64)."""
    d = max(64, int(round(math.sqrt(size_bytes / (itemsize * 12 * n_blocks)) / 64)) * 64)
    shapes = {}
    for b in range(n_blocks):
        p = f"layers.{b}."
        shapes.update(
            {
                p + "attn.qkv.weight": (3 * d, d),
                p + "attn.out.weight": (d, d),
                p + "mlp.up.weight": (4 * d, d),
                p + "mlp.down.weight": (d, 4 * d),
                p + "norm1.weight": (d,),
                p + "norm2.weight": (d,),
            }
        )
    return shapes


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], code: str) -> None:
    """Stream a safetensors file tensor by tensor (no second copy of the whole checkpoint)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(
                t.contiguous().view(torch.uint8).numpy().tobytes()
                if t.dtype == torch.bfloat16
                else t.contiguous().numpy().tobytes()
            )
    os.replace(tmp, path)


class Series:
    """A random-walk checkpoint series (theta_{t+1} = theta_t + 1e-3 * xi) written step by step;
    ``extend`` appends checkpoints, so a series can grow (incremental runs)."""

    def __init__(
        self, folder: Path, size_mb: float, dtype: str = "fp32", n_blocks: int = 2, seed: int = 0
    ):
        self.folder, self.dtype = Path(folder), dtype
        self.code, self.torch_dtype, self.itemsize = DTYPES[dtype]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.gen = torch.Generator().manual_seed(seed)
        self.state = {
            n: torch.randn(s, generator=self.gen) * 0.02
            for n, s in layer_shapes(size_mb * MB, self.itemsize, n_blocks).items()
        }
        self.files: list[Path] = []

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.state.values())

    def extend(self, n: int) -> list[Path]:
        for _ in range(n):
            step = 100 * len(self.files)
            if self.files:
                for t in self.state.values():
                    t.add_(torch.randn(t.shape, generator=self.gen), alpha=1e-3)
            path = self.folder / f"step_{step:06d}.safetensors"
            _write_safetensors(
                path, {k: v.to(self.torch_dtype) for k, v in self.state.items()}, self.code
            )
            self.files.append(path)
        return self.files

    def subset(self, folder: Path, n: int) -> Path:
        """A folder with hard links to the first ``n`` checkpoints (same page-cache pages)."""
        folder.mkdir(parents=True, exist_ok=True)
        for f in self.files[:n]:
            if not (folder / f.name).exists():
                os.link(f, folder / f.name)
        return folder


# ---------------------------------------------------------------------------- measurements
RAW_BUFFERS = (64 << 10, 1 << 20, 64 << 20)  # read sizes tried for the raw rate


def raw_read_rate(files, buffers=RAW_BUFFERS, repeats: int = 2) -> dict:
    """Sequential read rate of ``files`` (bytes/s) with a warm page cache: one untimed pass,
    then for each buffer size the best of ``repeats`` timed passes of ``readinto`` into one
    reused, pre-touched buffer. The raw rate is the best over buffer sizes (a cache-sized
    buffer makes the page-cache copy ~3x faster than a 64 MiB one on this machine), so ratios
    are against the fastest plain read of the same bytes."""

    def once(buf) -> int:
        total = 0
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while k := f.readinto(buf):
                    total += k
        return total

    by_buffer = {}
    for size in buffers:
        arr = np.ones(size, dtype=np.uint8)  # touched: no page faults inside the timing
        buf = memoryview(arr)
        once(buf)
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            total = once(buf)
            best = max(best, total / (time.perf_counter() - t))
        by_buffer[size] = best
    return {
        "bytes": total,
        "raw_bytes_per_s": max(by_buffer.values()),
        "raw_by_buffer": {str(k): v for k, v in by_buffer.items()},
    }


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _rss_anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_anon_bytes(root: int) -> int:
    """Sum of RssAnon over ``root`` and all its descendants (bytes)."""
    tree, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        total += _rss_anon_kib(pid)
        todo.extend(tree.get(pid, []))
    return total * 1024


ANALYZE_EXTRA_ARGS: list[str] = []  # e.g. ["--threads"], set from the command line


def run_analyze(
    folder, store, cache, spectral=False, workers=None, interval=0.05, params=None
) -> dict:
    """Wall time and peak anonymous memory (whole process tree) of `thermoscope analyze`."""
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "--quiet",
        "analyze",
        str(folder),
        "--store",
        str(store),
        "--cache",
        str(cache),
    ]
    if spectral:
        cmd.append("--spectral")
    if params:
        cmd += ["--params", str(params)]
    if workers:
        cmd += ["--workers", str(workers)]
    cmd += ANALYZE_EXTRA_ARGS
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_anon_bytes(proc.pid))
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"analyze failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"wall_s": wall, "peak_anon_bytes": peak[0], "command": " ".join(cmd[1:])}


def linear_fit(x, y) -> dict:
    """Least-squares y = a + b x and R^2."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    r2 = 1 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum()) if len(y) > 2 else 1.0
    return {"intercept": float(a), "slope": float(b), "r2": r2}


# ---------------------------------------------------------------------------- modes
def startup(root: Path, workers=None) -> dict:
    """Wall time of analyze on a 1-checkpoint tiny series (process, cluster and store overhead)."""
    s = Series(root / "tiny", 0.05)
    s.extend(1)
    return run_analyze(s.folder, root / "tiny.zarr", root / "tiny.cache", workers=workers)


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


def _repo_params() -> dict:
    """This repository's params.yaml (the defaults a researcher runs with)."""
    import yaml

    return yaml.safe_load((REPO / "params.yaml").read_text())


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
    params = _repo_params()
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
    tiny = Series(root / "inc-tiny", 0.05)
    tiny.extend(1)
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


def _block_tasks(s: Series, n: int, settings) -> list:
    """The measure stage's row-block tasks of the first ``n`` checkpoints of ``s``."""
    from pipeline.core.manifest import TensorInfo
    from pipeline.measure.kernel import BlockTask, layer_blocks

    files, steps = tuple(str(f) for f in s.files[:n]), tuple(range(0, 100 * n, 100))
    tensors = [TensorInfo(name, tuple(t.shape), s.code) for name, t in s.state.items()]
    return [
        BlockTask("run", t, a, b, files, steps)
        for t in tensors
        for a, b in layer_blocks(t, settings)
    ]


def _walk_slices(task, settings, step=None) -> None:
    """The kernel's reads: each cache slice of the block through every checkpoint (into two
    alternating buffers); ``step(current, previous, i)`` then runs on checkpoint i's slice."""
    from pipeline.ingest.safetensors_io import read_rows
    from pipeline.measure.kernel import cpu_slice_rows

    per_slice = cpu_slice_rows(task, settings)
    values = torch.empty((2, _slice_capacity(task, settings)))
    for a in range(task.start, task.stop, per_slice):
        b = min(a + per_slice, task.stop)
        m = (b - a) * task.tensor.row_elems
        for i, f in enumerate(task.files):
            current = read_rows(f, task.tensor.name, a, b, out=values[i % 2, :m])
            if step is not None:
                step(current, values[(i + 1) % 2, :m], i)


def _slice_capacity(task, settings) -> int:
    """Elements of the largest cache slice of ``task`` (as ``measure_block`` cuts them)."""
    from pipeline.measure.kernel import cpu_slice_rows

    return min(cpu_slice_rows(task, settings), task.stop - task.start) * task.tensor.row_elems


def _eager_passes(ring: torch.Tensor):
    """Lower bound of any eager-torch kernel for the default band, as a ``_walk_slices`` step:
    the four unavoidable passes (sum, sum of squares, increment into the (max_lag, n) ``ring``,
    its dot products with the ring rows); no window statistics, no bookkeeping."""

    def step(current, previous, i):
        m = current.numel()
        float(current.sum()), float(torch.dot(current, current))
        increment = ring[i % ring.shape[0], :m]
        torch.sub(current, previous, out=increment)
        torch.mv(ring[:, :m], increment)

    return step


def _fused_step_kernel():
    """The four unavoidable passes fused into one compiled loop (numba, when installed; else
    None): sum, sum of squares, increment into the ring, the increment's dot products with the
    ring rows, in sub-blocks of 2048 elements that stay in L1. A baseline for the floor only:
    what a compiled single-pass kernel would gain over eager torch (the library stays torch)."""
    try:
        from numba import njit
    except ImportError:
        return None

    @njit(fastmath=True, boundscheck=False, cache=False)
    def step(cur, prev, ring, slot, dots):  # pragma: no cover - compiled
        lags, n = ring.shape
        total, total_sq = 0.0, 0.0
        dots[:] = 0.0
        inc = ring[slot]
        for a in range(0, n, 2048):
            b = min(a + 2048, n)
            s, ss = np.float32(0.0), np.float32(0.0)
            for i in range(a, b):
                x = cur[i]
                s += x
                ss += x * x
                inc[i] = x - prev[i]
            total += s
            total_sq += ss
            for k in range(lags):
                row, d = ring[k], np.float32(0.0)
                for i in range(a, b):
                    d += row[i] * inc[i]
                dots[k] += d
        return total, total_sq

    return step


def _fused_passes(kernel, ring: torch.Tensor):
    """``_eager_passes`` as one compiled loop (``kernel`` from ``_fused_step_kernel``)."""
    dots = np.zeros(ring.shape[0])

    def step(current, previous, i):
        m = current.numel()
        kernel(current.numpy(), previous.numpy(), ring[:, :m].numpy(), i % ring.shape[0], dots)

    return step


def floor(root: Path, size_mb, n, dtype="fp32") -> dict:
    """Per-core floor of the measure kernel: one torch thread, no Dask, on the blocks of an
    n-checkpoint series (best of 2 each): the kernel's reads alone, the reads plus the four
    unavoidable passes of the band as eager torch and (numba installed) fused and compiled,
    ``measure_block`` itself, and ``measure_block`` run by one process per core at once; then
    the kernel cost of a +1-checkpoint rerun (``resume_from`` = n: ``max_lag`` priming reads
    and one measured checkpoint) in units of one checkpoint's share of the full kernel. The
    issue's throughput target (0.5x raw on P cores) needs 0.5 x raw / P per core."""
    import dataclasses

    from pipeline.measure.kernel import measure_block
    from pipeline.settings import MeasureSettings

    settings = MeasureSettings()
    s = Series(root / "floor", size_mb, dtype)
    s.extend(n + 1)
    raw = raw_read_rate(s.files[:n])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tasks = _block_tasks(s, n, settings)
        grown = [
            dataclasses.replace(
                t, files=t.files + (str(s.files[n]),), steps=t.steps + (100 * n,), resume_from=n
            )
            for t in tasks
        ]
        ring = lambda t: torch.zeros((settings.max_lag, _slice_capacity(t, settings)))  # noqa: E731
        kernels = {
            "read (cache slices)": lambda t: _walk_slices(t, settings),
            "read + sum, sumsq, increment, lag dots": lambda t: _walk_slices(
                t, settings, _eager_passes(ring(t))
            ),
            "measure_block (default metrics)": lambda t: measure_block(t, settings),
        }
        step = _fused_step_kernel()
        if step is not None:  # compile outside the timing
            step(
                *(np.zeros(4, np.float32),) * 2,
                np.zeros((settings.max_lag, 4), np.float32),
                0,
                np.zeros(settings.max_lag),
            )
            kernels["read + the same passes fused (numba)"] = lambda t: _walk_slices(
                t, settings, _fused_passes(step, ring(t))
            )
        seconds = {
            label: _best_of(2, lambda: [k(t) for t in tasks]) for label, k in kernels.items()
        }
        rerun = _best_of(2, lambda: [measure_block(t, settings) for t in grown])
        cores = os.cpu_count() or 1
        seconds["measure_block, one per core at once"] = _kernel_on_every_core(
            tasks, settings, cores
        )
    finally:
        torch.set_num_threads(before)
    elems = s.n_params * n
    nbytes = sum(f.stat().st_size for f in s.files[:n])
    shutil.rmtree(s.folder)
    rows = {
        label: {
            "seconds": t,
            "ns_per_elem": t / elems * 1e9,
            "bytes_per_s": nbytes / t,
            "ratio": nbytes / t / raw["raw_bytes_per_s"],
        }
        for label, t in seconds.items()
    }
    return {
        "size_mb": size_mb,
        "checkpoints": n,
        "dtype": dtype,
        "n_params": s.n_params,
        "cores": cores,
        "raw_bytes_per_s": raw["raw_bytes_per_s"],
        "kernels": rows,
        "needed_per_core_ratio": 0.5 / cores,
        "rerun_kernel_s": rerun,
        "rerun_over_share": rerun / (seconds["measure_block (default metrics)"] / n),
    }


def _kernel_seconds(tasks, settings) -> float:
    """Wall time (s) of ``measure_block`` over ``tasks`` in this process, one torch thread."""
    from pipeline.measure.kernel import measure_block

    torch.set_num_threads(1)
    return _best_of(1, lambda: [measure_block(t, settings) for t in tasks])


def _kernel_on_every_core(tasks, settings, cores: int) -> float:
    """Mean wall time (s) of the same kernel run by ``cores`` forked processes at once: what
    each core keeps of its one-core speed when all share the caches and the memory bus."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("fork")) as pool:
        return float(np.mean(list(pool.map(_kernel_seconds, [tasks] * cores, [settings] * cores))))


def _best_of(repeats: int, work) -> float:
    """Shortest wall time (s) of ``repeats`` calls of ``work``."""
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t)
    return best


def _params_file(path: Path, overrides: dict) -> Path:
    """This repository's params.yaml with ``overrides`` ({section: {key: value}}) applied."""
    import yaml

    params = _repo_params()
    for section, values in overrides.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params))
    return path


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
        params = _params_file(root / f"run{i}.yaml", overrides)
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


def ww_formulas(matrix: np.ndarray) -> tuple[float, float]:
    """WeightWatcher's spectral entropy and stable rank of one matrix, the way it computes them
    (RMT_Util.matrix_entropy / stable_rank): numpy SVD, rank = numpy matrix_rank tolerance,
    entropy = -sum p ln p / ln(rank) with p = s^2 / sum s^2, stable rank = sum s^2 / max s^2."""
    s = np.linalg.svd(matrix, compute_uv=False)
    tol = s.max() * max(matrix.shape) * np.finfo(s.dtype).eps
    rank = int((s > tol).sum())
    evals = s * s
    p = evals / evals.sum()
    p = p[p > 0]
    entropy = float(-(p * np.log(p)).sum() / np.log(rank if rank > 1 else 1.000001))
    return entropy, float(evals.sum() / evals.max())


def spectral_baselines(root: Path, size_mb=64, n=4, dtype="fp32", workers=None) -> dict:
    """--spectral analyze vs (a) numpy SVD of each 2-D layer per checkpoint with WW's formulas,
    (b) weightwatcher itself (when importable) on each checkpoint as a torch model."""
    import xarray as xr
    from safetensors.numpy import load_file

    s = Series(root / "spec", size_mb, dtype)
    s.extend(n)
    raw_read_rate(s.files, buffers=(1 << 20,), repeats=1)  # warm the page cache
    ours = run_analyze(
        s.folder, root / "spec.zarr", root / "spec.cache", spectral=True, workers=workers
    )
    t = time.perf_counter()
    base = {}
    for i, f in enumerate(s.files):
        tensors = (
            load_file(f)
            if dtype == "fp32"
            else {k: v.float().numpy() for k, v in _torch_load(f).items()}
        )
        for name, w in tensors.items():
            if w.ndim == 2:
                base[(i, name)] = ww_formulas(w.astype(np.float64))
    numpy_s = time.perf_counter() - t
    tree = xr.open_datatree(root / "spec.zarr", engine="zarr")
    ds = tree[list(tree.children)[0]].to_dataset()
    diffs = [
        max(
            abs(ds.spectral_entropy.isel(step=i).sel(layer=name).item() - e),
            abs(ds.stable_rank.isel(step=i).sel(layer=name).item() - r) / r,
        )
        for (i, name), (e, r) in base.items()
    ]
    out = {
        "size_mb": size_mb,
        "checkpoints": n,
        "analyze_spectral_s": ours["wall_s"],
        "numpy_svd_ww_formulas_s": numpy_s,
        "max_diff_vs_ww_formulas": max(diffs),
    }
    out.update(_weightwatcher(s.files))
    shutil.rmtree(s.folder)
    return out


def _torch_load(path):
    from safetensors.torch import load_file

    return load_file(path)


def _weightwatcher(files) -> dict:
    """Time weightwatcher.analyze on each checkpoint loaded into a torch model of Linear layers."""
    try:
        import logging

        import weightwatcher as ww

        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    except Exception as exc:  # noqa: BLE001 - optional baseline
        return {"weightwatcher": f"not available ({exc.__class__.__name__})"}
    t = time.perf_counter()
    frames = []
    for f in files:
        model = torch.nn.Sequential()
        for name, w in _torch_load(f).items():
            if w.dim() == 2:
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data = w.float()
                model.add_module(name.replace(".", "_"), lin)
        frames.append(
            ww.WeightWatcher(model=model).analyze(plot=False, randomize=False, mp_fit=False)
        )
    return {
        "weightwatcher_analyze_s": time.perf_counter() - t,
        "weightwatcher_version": ww.__version__,
        "weightwatcher_columns": [c for c in ("entropy", "stable_rank") if c in frames[0].columns],
    }


# ---------------------------------------------------------------------------- output
def _gb(x):
    return f"{x / 1e9:.2f}"


def format_tables(results: dict) -> str:
    lines = []
    if "startup" in results:
        lines.append(
            f"startup (1 tiny checkpoint): {results['startup']['wall_s']:.2f} s, "
            f"peak anon {_gb(results['startup']['peak_anon_bytes'])} GB"
        )
    if "throughput" in results:
        r = results["throughput"]
        lines.append(
            f"\nthroughput: {r['checkpoints']} x {r['size_mb']} MB {r['dtype']} ({r['n_params']:,} params), "
            f"raw read {_gb(r['raw_bytes_per_s'])} GB/s (best of buffers: "
            + ", ".join(f"{int(k) >> 10} KiB {_gb(v)}" for k, v in r["raw_by_buffer"].items())
            + ")"
        )
        lines.append(
            f"{'metrics':10s} {'wall s':>8s} {'GB/s':>6s} {'ratio':>6s} {'marg GB/s':>9s} {'marg ratio':>10s} {'peak anon GB':>12s}"
        )
        for label in ("default", "spectral"):
            if label in r:
                x = r[label]
                lines.append(
                    f"{label:10s} {x['wall_s']:8.2f} {_gb(x['bytes_per_s']):>6s} {x['ratio']:6.2f} "
                    f"{_gb(x['marginal_bytes_per_s']):>9s} {x['marginal_ratio']:10.2f} {_gb(x['peak_anon_bytes']):>12s}"
                )
    if "memory" in results:
        r = results["memory"]
        lines.append(f"\nmemory: {r['size_mb']} MB {r['dtype']} checkpoints")
        for x in r["rows"]:
            lines.append(
                f"  {x['checkpoints']:3d} checkpoints: wall {x['wall_s']:7.2f} s, peak anon {_gb(x['peak_anon_bytes'])} GB"
            )
    if "scaling" in results:
        r = results["scaling"]
        lines.append("\nscaling in checkpoint count:")
        lines += [
            f"  {x['checkpoints']:3d} checkpoints: {x['wall_s']:7.2f} s" for x in r["by_count"]
        ]
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
    if "incremental" in results:
        r = results["incremental"]
        lines.append(
            f"\nincremental ({r['via']}): full {r['checkpoints']} x {r['size_mb']} MB: {r['full_wall_s']:.2f} s "
            f"({r['per_checkpoint_s']:.2f} s/checkpoint); +1 checkpoint rerun {r['rerun_wall_s']:.2f} s "
            f"= {r['rerun_over_share']:.2f}x the per-checkpoint share"
        )
        lines.append(
            f"  net of the start-up ({r['startup_s']:.2f} s, the same on a 1-checkpoint tiny series): rerun "
            f"{r['rerun_wall_s'] - r['startup_s']:.2f} s = {r['net_rerun_over_net_share']:.2f}x the net share "
            f"{(r['full_wall_s'] - r['startup_s']) / r['checkpoints']:.2f} s"
        )
    if "big" in results:
        r = results["big"]
        lines.append(
            "\nbig: "
            + (
                r["skipped"]
                if "skipped" in r
                else f"{r['checkpoints']} x {r['n_params']:,} params bf16 ({_gb(r['bytes'])} GB): wall {r['wall_s']:.1f} s, "
                f"{_gb(r['bytes_per_s'])} GB/s = {r['ratio']:.2f}x raw ({_gb(r['raw_bytes_per_s'])} GB/s), "
                f"peak anon {_gb(r['peak_anon_bytes'])} GB"
            )
        )
    if "devices" in results:
        r = results["devices"]
        lines.append(
            f"\ndevices: {r['checkpoints']} x {r['size_mb']} MB {r['dtype']} ({r['n_params']:,} params"
            f"{', --spectral' if r['spectral'] else ''}), GPU {r['gpu']}, raw read {_gb(r['raw_bytes_per_s'])} GB/s"
        )
        lines.append(
            f"{'run':22s} {'wall s':>8s} {'GB/s':>6s} {'ratio':>6s} {'peak anon GB':>12s}  largest difference from cpu"
        )
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
                f"{label:22s} {x['wall_s']:8.2f} {_gb(x['bytes_per_s']):>6s} {x['ratio']:6.2f} "
                f"{_gb(x['peak_anon_bytes']):>12s}  {diff}"
            )
    if "floor" in results:
        r = results["floor"]
        lines.append(
            f"\nfloor (one torch thread per process, no Dask): {r['checkpoints']} x {r['size_mb']} MB {r['dtype']} "
            f"({r['n_params']:,} params), raw read {_gb(r['raw_bytes_per_s'])} GB/s"
        )
        lines.append(f"  {'kernel':40s} {'ns/elem':>8s} {'GB/s':>6s} {'x raw':>6s}")
        for label, x in r["kernels"].items():
            lines.append(
                f"  {label:40s} {x['ns_per_elem']:8.2f} {_gb(x['bytes_per_s']):>6s} {x['ratio']:6.2f}"
            )
        lines.append(
            f"  needed per core for 0.5x raw on {r['cores']} cores: {r['needed_per_core_ratio']:.2f} x raw "
            f"= {_gb(r['needed_per_core_ratio'] * r['raw_bytes_per_s'])} GB/s"
        )
        lines.append(
            f"  +1 checkpoint (resume at {r['checkpoints']}: priming reads + 1 measured): "
            f"{r['rerun_kernel_s']:.2f} s = {r['rerun_over_share']:.2f}x a checkpoint's kernel share"
        )
    if "spectral" in results:
        r = results["spectral"]
        lines.append(
            f"\nspectral: {r['checkpoints']} x {r['size_mb']} MB: analyze --spectral {r['analyze_spectral_s']:.2f} s; "
            f"numpy SVD + WW formulas {r['numpy_svd_ww_formulas_s']:.2f} s; max |diff| {r['max_diff_vs_ww_formulas']:.2e}"
        )
        if "weightwatcher_analyze_s" in r:
            lines.append(
                f"  weightwatcher {r['weightwatcher_version']} analyze on each checkpoint: {r['weightwatcher_analyze_s']:.2f} s"
            )
        else:
            lines.append(f"  weightwatcher: {r['weightwatcher']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--size",
        type=float,
        default=256,
        help="MB per checkpoint (throughput, incremental; largest size of scaling)",
    )
    p.add_argument("--checkpoints", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--spectral", action="store_true", help="also time analyze --spectral")
    p.add_argument("--workers", type=int, default=None)
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--threads", action="store_true", help="pass --threads to analyze (thread workers)"
    )
    kind.add_argument(
        "--processes",
        action="store_true",
        help="pass --processes to analyze (worker processes at every size: one regime for scaling fits)",
    )
    p.add_argument(
        "--mode",
        default="throughput",
        choices=[
            "throughput",
            "memory",
            "scaling",
            "incremental",
            "big",
            "spectral",
            "devices",
            "floor",
            "all",
        ],
    )
    p.add_argument(
        "--device",
        default="cuda",
        help="devices: the torch device compared with the CPU (an accelerator: cuda, cuda:1, ...)",
    )
    p.add_argument(
        "--via",
        choices=sorted(RUNNERS),
        default="analyze",
        help="incremental: time `thermoscope analyze` or `dvc repro` of the whole pipeline",
    )
    p.add_argument("--dir", default=None, help="where to write the series (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = p.parse_args(argv)
    ANALYZE_EXTRA_ARGS[:] = (
        ["--threads"] if args.threads else ["--processes"] if args.processes else []
    )
    root = Path(tempfile.mkdtemp(prefix="thermoscope-bench-", dir=args.dir))
    modes = (
        ["throughput", "incremental", "memory", "scaling", "spectral", "big"]
        if args.mode == "all"
        else [args.mode]
    )
    results = {"machine": machine(), "argv": sys.argv, "startup": startup(root, args.workers)}
    try:
        for mode in modes:
            if mode == "throughput":
                results[mode] = throughput(
                    root, args.size, args.checkpoints, args.dtype, args.spectral, args.workers
                )
            elif mode == "memory":
                results[mode] = memory(root, dtype=args.dtype, workers=args.workers)
            elif mode == "scaling":
                results[mode] = scaling(
                    root,
                    args.size,
                    sizes=(args.size / 4, args.size / 2, args.size),
                    dtype=args.dtype,
                    workers=args.workers,
                )
            elif mode == "incremental":
                results[mode] = incremental(
                    root, args.size, dtype=args.dtype, workers=args.workers, via=args.via
                )
            elif mode == "devices":
                results[mode] = devices(
                    root,
                    args.size,
                    args.checkpoints,
                    args.dtype,
                    args.spectral,
                    args.workers,
                    args.device,
                )
            elif mode == "big":
                results[mode] = big(root, workers=args.workers)
            elif mode == "floor":
                results[mode] = floor(root, args.size, args.checkpoints, args.dtype)
            else:
                results[mode] = spectral_baselines(
                    root, args.size, args.checkpoints, dtype=args.dtype, workers=args.workers
                )
            print(format_tables({mode: results[mode]}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(format_tables({"startup": results["startup"]}))
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        "?",
    )
    mem = next(
        (
            int(line.split()[1]) * 1024
            for line in open("/proc/meminfo")
            if line.startswith("MemTotal")
        ),
        0,
    )
    return {
        "nproc": os.cpu_count(),
        "memory_bytes": mem,
        "cpu": model,
        "torch": torch.__version__,
        "load_avg": os.getloadavg(),
    }


if __name__ == "__main__":
    sys.exit(main())
