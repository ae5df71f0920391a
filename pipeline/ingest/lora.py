"""LoRA / PEFT adapter series: each adapted module analysed as one layer, its effective update.

A PEFT checkpoint holds only ``adapter_model.safetensors`` (``<prefix>.<module>.lora_A.weight``
(r, in) and ``lora_B.weight`` (out, r), plus any ``modules_to_save`` copies) and
``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``, ``fan_in_fan_out``,
``alpha_pattern``...). The module's weight update is

    dW = s * B @ A,  s = alpha / r  (rsLoRA: alpha / sqrt(r));  Hu et al. 2021, Kalajdzievski 2023

(transposed when ``fan_in_fan_out``: the base weight is stored (in, out), GPT-2's Conv1D). With
the base model's weights the analysed layer is W0 + dW (what the fine-tuned model computes
with), without them dW alone; the layer name and the ``lora_part`` layer coordinate say which.
The layers are virtual tensors (``TensorSource``): ``lora_rows`` computes a row block in the
measurement task from A, the block's rows of B and of W0, so memory stays bounded by the block
and no merged copy is ever written. r is taken from A's shape (it includes ``rank_pattern``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pipeline.core.errors import InputError
from pipeline.core.manifest import Checkpoint, Run, TensorInfo, TensorSource
from pipeline.ingest import remote
from pipeline.ingest.safetensors_io import DTYPES, is_float_dtype, load_header, read_rows

if TYPE_CHECKING:
    import torch

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 10_000_000  # an adapter_config.json larger than this is refused
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
#: ``lora_part`` layer coordinate: what each analysed layer of an adapter series is.
PART_MERGED, PART_DELTA, PART_A, PART_B = "W0+dW", "dW", "A", "B"


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that set the update's scale and layout."""

    path: str
    lora_alpha: float
    r: int
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    alpha_pattern: dict = field(default_factory=dict)

    def scale(self, module: str, r: int) -> float:
        """alpha / r (rsLoRA: alpha / sqrt(r)) for ``module`` of rank ``r``; ``alpha_pattern``
        keys match a module name's dotted suffix, as PEFT matches them."""
        alpha = self.lora_alpha
        for key, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                alpha = float(value)
                break
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def read_adapter_config(path) -> AdapterConfig:
    """Parse and check ``adapter_config.json``; ``InputError`` naming it on any problem."""
    path = os.fspath(path)
    try:
        cfg = json.loads(remote.read_bytes(path, MAX_CONFIG_BYTES).decode("utf-8"))
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(path, f"cannot parse JSON ({str(e)[:120]})") from None
    if not isinstance(cfg, dict):
        raise InputError(path, "adapter_config.json is not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise InputError(path, f"peft_type {cfg.get('peft_type')!r}: only LoRA adapters are read")
    if cfg.get("use_dora"):
        raise InputError(path, "DoRA adapter (use_dora): its merged weight is not W0 + dW")
    alpha, r = cfg.get("lora_alpha"), cfg.get("r")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise InputError(path, f"lora_alpha {alpha!r} is not a number")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InputError(path, f"r {r!r} is not a positive integer")
    patterns = cfg.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise InputError(path, "alpha_pattern is not an object")
    return AdapterConfig(
        path,
        float(alpha),
        r,
        bool(cfg.get("use_rslora", False)),
        bool(cfg.get("fan_in_fan_out", False)),
        patterns,
    )


def _pairs(tensors: list[TensorInfo], where: str) -> tuple[dict, list[TensorInfo]]:
    """({module: (A, B)}, other tensors). ``module`` drops PEFT's ``base_model.model.``."""
    found: dict[str, dict[str, TensorInfo]] = {}
    others = []
    for t in tensors:
        m = _PAIR.match(t.name)
        if m and len(t.shape) == 2:
            module = m.group("module").removeprefix(PEFT_PREFIX)
            found.setdefault(module, {})[m.group("part")] = t
        else:
            others.append(t)
    pairs = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise InputError(where, f"module '{module}' has lora_{''.join(ab)} only")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise InputError(where, f"A {a.shape} and B {b.shape} ranks differ", a.name)
        pairs[module] = (a, b)
    return pairs, others


@dataclass(frozen=True)
class BaseModel:
    """The base model's float tensors: {name: (file, TensorInfo)} and a digest per file."""

    path: str
    tensors: dict[str, tuple[str, TensorInfo]]
    digests: dict[str, str]

    def find(self, module: str) -> tuple[str, TensorInfo] | None:
        """The base weight of ``module``: ``<module>.weight``, else the one name that ends with
        it (or that it ends with: a head model saved with or without its wrapper's prefix)."""
        want = f"{module}.weight"
        if want in self.tensors:
            return self.tensors[want]
        hits = [
            n for n in self.tensors if n.endswith("." + want) or want.endswith("." + n) or n == want
        ]
        return self.tensors[hits[0]] if len(hits) == 1 else None


def load_base_model(path) -> BaseModel:
    """Headers of the base model: a ``.safetensors`` file, or a folder of them (single or
    sharded Hugging Face layout), local or a URL (``remote``). Only headers are read."""
    path = remote.normalize(path)
    if remote.isfile(path):
        files = [path]
    elif remote.isdir(path):
        files = sorted(
            e.path for e in remote.entries(path) if e.name.endswith(".safetensors") and not e.is_dir
        )
    else:
        raise InputError(path, "base model not found (a .safetensors file or a folder of them)")
    if not files:
        raise InputError(path, "base model folder holds no .safetensors file")
    tensors, digests = {}, {}
    for f in files:
        header = load_header(f)
        h = hashlib.sha256()
        header.digest_into(h)
        digests[f] = h.hexdigest()[:16]
        for name, (dtype, shape, _) in header.tensors.items():
            if is_float_dtype(dtype):
                tensors[name] = (f, TensorInfo(name, shape, dtype))
    return BaseModel(path, tensors, digests)


def _nbytes(t: TensorInfo) -> int:
    return t.n_params * DTYPES[t.dtype].itemsize


def _virtual(
    module: str, a: TensorInfo, b: TensorInfo, cfg: AdapterConfig, base: BaseModel | None
) -> TensorInfo:
    r, (out_dim, in_dim) = a.shape[0], (b.shape[0], a.shape[1])
    shape = (in_dim, out_dim) if cfg.fan_in_fan_out else (out_dim, in_dim)
    factors = _nbytes(a) + _nbytes(b)
    source = TensorSource(a.name, b.name, r, cfg.scale(module, r), cfg.fan_in_fan_out)
    if base is None:
        source = replace(source, factor_bytes=factors)
        return TensorInfo(f"{module}.delta_weight", shape, "F32", source)
    hit = base.find(module)
    if hit is None:
        raise InputError(base.path, f"no base weight for the adapted module '{module}'")
    file, w0 = hit
    if tuple(w0.shape) != shape:
        raise InputError(file, f"base weight {w0.shape} does not match the update {shape}", w0.name)
    source = replace(
        source,
        base_file=file,
        base_name=w0.name,
        base_digest=base.digests[file],
        factor_bytes=factors,
        base_bytes=_nbytes(w0),
    )
    return TensorInfo(w0.name, shape, "F32", source)


def adapter_tensors(
    tensors: list[TensorInfo], cfg: AdapterConfig, base: BaseModel | None, raw: bool = False
) -> list[TensorInfo]:
    """The layers of an adapter checkpoint: one virtual tensor per adapted module (W0 + dW with
    ``base``, else dW named ``<module>.delta_weight``), the raw A and B when ``raw``, and every
    other tensor (``modules_to_save`` copies, ...) as stored."""
    pairs, others = _pairs(tensors, cfg.path)
    out = []
    for module, (a, b) in sorted(pairs.items()):
        out.append(_virtual(module, a, b, cfg, base))
        if raw:
            out += [a, b]
    return out + others


def lora_part(tensor: TensorInfo) -> str:
    """The ``lora_part`` coordinate of a layer: W0+dW, dW, A, B, or "" for a stored tensor."""
    if tensor.source is not None:
        return PART_MERGED if tensor.source.base_file else PART_DELTA
    m = _PAIR.match(tensor.name)
    return {"A": PART_A, "B": PART_B}[m.group("part")] if m else ""


def lora_rows(
    path: str, tensor: TensorInfo, start: int, stop: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows [start, stop) of the virtual tensor ``tensor`` for the adapter file ``path``, float32:
    ``scale * B[start:stop] @ A`` (fan_in_fan_out: ``scale * A[:, start:stop].T @ B.T``), plus
    ``W0[start:stop]``. Reads A and B whole-rank (r rows/columns: small) and only the block's
    rows of W0, straight into ``out`` (flat float32 of the block's size) when given; one fused
    ``addmm`` then adds the scaled product in place (no temporary of the block's size)."""
    import torch

    src = tensor.source
    a = read_rows(path, src.lora_a, 0, src.rank)
    if src.fan_in_fan_out:
        b = read_rows(path, src.lora_b, 0, tensor.shape[1])
        lhs, rhs = a[:, start:stop].T, b.T
    else:
        lhs, rhs = read_rows(path, src.lora_b, start, stop), a
    shape = (stop - start, tensor.shape[1])
    n = shape[0] * shape[1]
    buf = out if out is not None and out.numel() == n else torch.empty(n, dtype=torch.float32)
    res = buf.view(shape)
    if not src.base_file:
        return torch.mm(lhs, rhs, out=res).mul_(src.scale)
    w0 = read_rows(src.base_file, src.base_name, start, stop, out=buf)
    if w0.data_ptr() != buf.data_ptr():  # a dtype or source read_rows cannot read in place
        res.copy_(w0.reshape(shape))
    return res.addmm_(lhs, rhs, alpha=src.scale)


def _adapter_config_of(ck: Checkpoint) -> str | None:
    """``adapter_config.json`` beside the checkpoint's files (PEFT's save_pretrained folder)."""
    folders = {remote.dirname(f) for f in ck.files.values()}
    paths = [remote.join(d, ADAPTER_CONFIG) for d in sorted(folders)]
    return next((p for p in paths if remote.isfile(p)), None)


def adapter_configs(run: Run) -> list[str | None]:
    """The ``adapter_config.json`` of each checkpoint of ``run`` (None where there is none)."""
    return [_adapter_config_of(c) for c in run.checkpoints]


def adapt_run(run: Run, base: BaseModel | None = None, raw: bool = False) -> Run:
    """``run`` with its adapter tensors replaced by one layer per adapted module (see
    ``adapter_tensors``) when its checkpoints are PEFT adapter folders; unchanged otherwise.
    Every checkpoint must carry an ``adapter_config.json`` with the same scale and layout."""
    paths = adapter_configs(run)
    if not any(paths):
        return run
    missing = [c for c, p in zip(run.checkpoints, paths) if p is None]
    if missing:
        where = remote.dirname(next(iter(missing[0].files.values())))
        raise InputError(where, f"no {ADAPTER_CONFIG}, unlike the run's other checkpoints")
    configs = [read_adapter_config(p) for p in paths]
    first = configs[0]
    for cfg in configs[1:]:
        if replace(cfg, path=first.path) != first:
            raise InputError(cfg.path, f"LoRA scale or layout differs from {first.path}")
    tensors = adapter_tensors(run.tensors, first, base, raw)
    checkpoints = [
        replace(
            c, files={t.name: c.files[t.source.lora_a if t.source else t.name] for t in tensors}
        )
        for c in run.checkpoints
    ]
    acts = {t.name: run.activations[t.name] for t in tensors if t.name in run.activations}
    return replace(run, checkpoints=checkpoints, tensors=tensors, activations=acts)
