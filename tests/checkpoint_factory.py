"""Writes small, real checkpoint series (safetensors.torch.save_file) in every layout that
discovery reads: flat folders, Hugging Face Trainer folders (single file or sharded with an
index), and sweeps of runs. Shared by the tests of several modules.

The model is a tiny dict of tensors whose names exercise natural ordering
(``layers.2`` before ``layers.10``) plus, optionally, an integer buffer that is not a layer.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES: dict[str, tuple[int, ...]] = {
    "layers.0.weight": (8, 4),
    "layers.0.bias": (8,),
    "layers.10.weight": (4, 8),
    "layers.2.weight": (8, 8),
}
NATURAL_ORDER = ["layers.0.bias", "layers.0.weight", "layers.2.weight", "layers.10.weight"]


def model_tensors(
    step: int, dtype: torch.dtype = torch.float32, seed: int = 0, buffers: bool = False
) -> dict[str, torch.Tensor]:
    """Tensors of the tiny model at ``step``: a fixed random start plus a step-dependent random
    walk, cast to ``dtype``. ``buffers`` adds an int64 ``position_ids`` buffer (not a layer)."""
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        g0 = torch.Generator().manual_seed(seed * 1000 + i)
        g1 = torch.Generator().manual_seed(seed * 1000 + i + 10_000 * (step + 1))
        out[name] = (
            torch.randn(shape, generator=g0) + 0.01 * step * torch.randn(shape, generator=g1)
        ).to(dtype)
    if buffers:
        out["position_ids"] = torch.arange(16, dtype=torch.int64)
    return out


def write_file(
    path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """One safetensors file; parent folders are created. Returns the absolute path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path.resolve())


def write_flat(
    folder,
    steps,
    dtype=torch.float32,
    pattern: str = "step_{step:06d}.safetensors",
    seed: int = 0,
    metadata_step: bool = False,
    buffers: bool = False,
) -> list[str]:
    """Flat layout: one file per step named by ``pattern`` (``{step}`` is substituted);
    ``metadata_step`` also records the step in ``__metadata__``."""
    paths = []
    for s in steps:
        meta = {"step": str(s)} if metadata_step else None
        paths.append(
            write_file(
                Path(folder) / pattern.format(step=s), model_tensors(s, dtype, seed, buffers), meta
            )
        )
    return paths


def trainer_state(steps, lr0: float = 0.1) -> dict:
    """A trainer_state.json body with a loss/learning-rate entry per step and an eval entry."""
    hist = []
    for s in steps:
        hist.append(
            {"step": s, "loss": 1.0 / (1 + s), "learning_rate": lr0 / (1 + s), "epoch": s / 10}
        )
        hist.append({"step": s, "eval_loss": 2.0 / (1 + s)})
    return {"global_step": max(steps) if steps else 0, "log_history": hist}


def write_trainer(
    folder,
    steps,
    dtype=torch.float32,
    sharded: bool = False,
    seed: int = 0,
    log: bool = True,
    hidden_act: str | None = "gelu",
    buffers: bool = False,
) -> list[str]:
    """Hugging Face Trainer layout: ``checkpoint-<step>/model.safetensors`` (or two shards plus
    ``model.safetensors.index.json``), with trainer_state.json (history up to that step) and
    config.json in each checkpoint folder. Returns the checkpoint folders."""
    dirs = []
    steps = list(steps)
    for s in steps:
        d = Path(folder) / f"checkpoint-{s}"
        tensors = model_tensors(s, dtype, seed, buffers)
        if sharded:
            write_sharded(d, tensors)
        else:
            write_file(d / "model.safetensors", tensors)
        if log:
            (d / "trainer_state.json").write_text(
                json.dumps(trainer_state(sorted(t for t in steps if t <= s)))
            )
        if hidden_act is not None:
            (d / "config.json").write_text(json.dumps({"hidden_act": hidden_act}))
        dirs.append(str(d.resolve()))
    return dirs


def write_sharded(folder, tensors: dict[str, torch.Tensor], n_shards: int = 2) -> str:
    """Shards ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``.

    Returns the index path.
    """
    folder = Path(folder)
    names = list(tensors)
    weight_map = {}
    for k in range(n_shards):
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::n_shards]}
        write_file(folder / fname, part)
        weight_map.update({n: fname for n in part})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(index.resolve())


def write_sweep(root, run_names, steps, layout: str = "flat", dtype=torch.float32) -> list[str]:
    """A sweep: one subfolder per run, each in ``layout`` ("flat" or "trainer")."""
    out = []
    for i, name in enumerate(run_names):
        d = Path(root) / name
        if layout == "flat":
            write_flat(d, steps, dtype, seed=i)
        else:
            write_trainer(d, steps, dtype, seed=i)
        out.append(str(d.resolve()))
    return out


def write_raw(path, header, data: bytes = b"", length: int | None = None) -> str:
    """A hand-built safetensors file: ``header`` (dict -> JSON, or raw bytes), the data bytes,
    and optionally a forged length prefix. For bad-input tests."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body) if length is None else length))
        f.write(body)
        f.write(data)
    return str(Path(path).resolve())


def write_random_walk(folder, shape, n: int, nan_at=None, seed: int = 0, dtype=torch.float32):
    """A random walk with drift (values ~0.1, steps ~1e-3) of ``n`` checkpoints of one tensor
    ``w`` saved in ``dtype`` (``step_000.safetensors`` ...); ``nan_at`` = (checkpoint, row, col)
    poisoned with NaN and (row+1, col) with +Inf. Returns (fp32 values as written before the
    cast, file paths, steps 0, 10, ...)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(shape, generator=g)
    drift = 1e-3 * torch.randn(shape, generator=g)
    values, files = [], []
    for i in range(n):
        v = x.clone()
        if nan_at and nan_at[0] == i:
            v[nan_at[1], nan_at[2]] = float("nan")
            v[nan_at[1] + 1, nan_at[2]] = float("inf")
        values.append(v)
        files.append(str(Path(folder) / f"step_{i:03d}.safetensors"))
        save_file({"w": v.to(dtype)}, files[-1])
        x = x + drift + 1e-3 * torch.randn(shape, generator=g)
    return values, tuple(files), tuple(range(0, 10 * n, 10))
