"""Per-(run, layer) measurement cache: work already done is not redone.

Each finished layer is saved (atomically) with the identity of the checkpoints it covered:
their ``header_hash`` (headers, file sizes and mtimes; see ``safetensors_io.Header``). A later
run whose checkpoints extend a cached prefix measures only the new ones (priming the lag buffer
from the last cached checkpoints); a run interrupted midway (even by kill -9) resumes with the
layers it had finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.core.code import source_digest
from pipeline.core.manifest import Run, TensorInfo
from pipeline.settings import MeasureSettings

# the code that produces a layer result: a change to any file it imports invalidates the cache
MEASURING_MODULE = "pipeline.measure.kernel"


class LayerCache:
    """Cached layer results under ``root/<settings + code hash>/<run>/<tensor>.npz``."""

    def __init__(self, root, settings: MeasureSettings):
        relevant = {k: v for k, v in asdict(settings).items() if k != "device"}
        relevant["code"] = source_digest([MEASURING_MODULE])
        digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
        self.root = Path(root) / digest

    def _path(self, run: Run, tensor: TensorInfo) -> Path:
        # a virtual tensor's source (LoRA scale, base model file and its digest) is its identity
        ident = f"{tensor.name}|{tensor.shape}|{tensor.dtype}|{tensor.source or ''}"
        key = hashlib.sha256(ident.encode()).hexdigest()[:12]
        return self.root / run.name.replace("/", "_") / f"{key}.npz"

    def load(self, run: Run, tensor: TensorInfo) -> tuple[dict | None, int]:
        """(cached result, number of leading checkpoints it covers) or (None, 0)."""
        path = self._path(run, tensor)
        if not path.exists():
            return None, 0
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError):
            return None, 0
        ids = [c.header_hash for c in run.checkpoints]
        cached_ids = list(data.pop("_ids"))
        if len(cached_ids) > len(ids) or ids[: len(cached_ids)] != cached_ids:
            return None, 0
        return data, len(cached_ids)

    def save(self, run: Run, tensor: TensorInfo, result: dict) -> None:
        path = self._path(run, tensor)
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.array([c.header_hash for c in run.checkpoints])
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, _ids=ids, **result)
        os.replace(tmp, path)


def merge(cached: dict | None, new: dict) -> dict:
    """Append newly measured steps/windows to a cached prefix."""
    if cached is None:
        return new
    merged = {}
    for key, value in new.items():
        merged[key] = np.concatenate([cached[key], value]) if key in cached else value
    return merged
