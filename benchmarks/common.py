"""What every benchmark shares: the synthetic series, the raw read rate of its files, timing
`thermoscope analyze` with the peak anonymous memory of its process tree, fits, the machine's
description and the command line.

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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.ingest.safetensors_io import DTYPES, torch_dtype  # noqa: E402 (after sys.path)

#: --dtype name -> safetensors code (torch dtype and item size come from the one dtype table)
DTYPE_CODES = {"fp32": "F32", "bf16": "BF16"}
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


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], code: str) -> None:
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
        self.code = DTYPE_CODES[dtype]
        self.torch_dtype, self.itemsize = torch_dtype(self.code), DTYPES[self.code].itemsize
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
            write_safetensors(
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
    folder, store, cache, spectral=False, workers=None, interval=0.05, params=None, code=REPO
) -> dict:
    """Wall time and peak anonymous memory (whole process tree) of `thermoscope analyze`, run
    with the ``pipeline`` package of the tree ``code`` (default: this checkout; another one,
    e.g. a git ref exported by ``export_tree``, for before/after figures)."""
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
    proc = subprocess.Popen(
        cmd, cwd=code, env=code_env(code), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
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


def code_env(code: Path) -> dict:
    """The environment of a subprocess that must import ``pipeline`` from the tree ``code``;
    resident clusters off (each timed run starts its own; ``startup.py`` times them apart)."""
    return {**os.environ, "PYTHONPATH": str(code), "THERMOSCOPE_KEEP_ALIVE": "0"}


def export_tree(ref: str, into: Path) -> Path:
    """The ``pipeline`` package as of git ``ref`` of this repository, written under ``into``
    (``git archive``): the code a before/after benchmark runs as "before"."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", ref, "pipeline"], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def linear_fit(x, y) -> dict:
    """Least-squares y = a + b x and R^2."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    r2 = 1 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum()) if len(y) > 2 else 1.0
    return {"intercept": float(a), "slope": float(b), "r2": r2}


def best_of(repeats: int, work) -> float:
    """Shortest wall time (s) of ``repeats`` calls of ``work``."""
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t)
    return best


def repo_params() -> dict:
    """This repository's params.yaml (the defaults a researcher runs with)."""
    import yaml

    return yaml.safe_load((REPO / "params.yaml").read_text())


def params_file(path: Path, overrides: dict) -> Path:
    """This repository's params.yaml with ``overrides`` ({section: {key: value}}) applied."""
    import yaml

    params = repo_params()
    for section, values in overrides.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params))
    return path


def block_tasks(s: Series, n: int, settings) -> list:
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


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    mem = next(
        (
            int(line.split()[1]) * 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
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


def gb(x) -> str:
    """Bytes (or bytes/s) as GB with two decimals."""
    return f"{x / 1e9:.2f}"


def tiny_series(root: Path, name: str = "tiny") -> Series:
    """A 1-checkpoint, 50 KB series: a run on it costs the start-up and nothing else."""
    s = Series(root / name, 0.05)
    s.extend(1)
    return s


def startup(root: Path, workers=None) -> dict:
    """Wall time of analyze on a 1-checkpoint tiny series (process, cluster and store overhead)."""
    s = tiny_series(root)
    return run_analyze(s.folder, root / "tiny.zarr", root / "tiny.cache", workers=workers)


def format_startup(r: dict) -> str:
    return (
        f"startup (1 tiny checkpoint): {r['wall_s']:.2f} s, peak anon {gb(r['peak_anon_bytes'])} GB"
    )


# ---------------------------------------------------------------------------- command line
# A mode: (run(root, args) -> result dict, format(result) -> text).
Mode = tuple[Callable[[Path, argparse.Namespace], dict], Callable[[dict], str]]


def parser(
    description: str, modes: dict[str, Mode], default_size: float = 256
) -> argparse.ArgumentParser:
    """The options every benchmark script takes (``--mode`` chooses among ``modes``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--mode", default=next(iter(modes)), choices=[*modes, *(["all"] if len(modes) > 1 else [])]
    )
    p.add_argument("--size", type=float, default=default_size, help="MB per checkpoint")
    p.add_argument("--checkpoints", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPE_CODES), default="fp32")
    p.add_argument("--workers", type=int, default=None)
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--threads", action="store_true", help="pass --threads to analyze")
    kind.add_argument(
        "--processes",
        action="store_true",
        help="pass --processes to analyze (worker processes at every size: one regime for fits)",
    )
    p.add_argument("--dir", default=None, help="where to write the series (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    p.add_argument(
        "--no-startup", action="store_true", help="skip the tiny 1-checkpoint analyze row"
    )
    return p


def main(description: str, modes: dict[str, Mode], argv=None, setup=None) -> int:
    """Parse the command line, run the chosen mode(s) in a temp dir (removed afterwards), print
    each result as it comes, then the start-up row and, with ``--json``, everything as JSON.
    ``setup(parser)`` adds a script's own options."""
    p = parser(description, modes)
    if setup is not None:
        setup(p)
    args = p.parse_args(argv)
    ANALYZE_EXTRA_ARGS[:] = (
        ["--threads"] if args.threads else ["--processes"] if args.processes else []
    )
    root = Path(tempfile.mkdtemp(prefix="thermoscope-bench-", dir=args.dir))
    chosen = list(modes) if args.mode == "all" else [args.mode]
    results = {"machine": machine(), "argv": sys.argv}
    try:
        if not args.no_startup:
            results["tiny_startup"] = startup(root, args.workers)
        for mode in chosen:
            run, fmt = modes[mode]
            results[mode] = run(root, args)
            print(fmt(results[mode]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if "tiny_startup" in results:
        print(format_startup(results["tiny_startup"]))
    if args.json:
        print(json.dumps(results, indent=1, default=str))
    return 0
