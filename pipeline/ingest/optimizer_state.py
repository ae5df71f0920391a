"""Optimizer state saved beside checkpoints: what optimizer ran, its hyperparameters at each
checkpoint, and which state entry belongs to which weight tensor (METHODS.md, section 3b).

Read safely and lazily. Hugging Face ``optimizer.pt`` and Accelerate ``optimizer.bin`` are
opened only with ``torch.load(path, weights_only=True, mmap=True)``: no unpickler runs, and
tensors stay memory-mapped, so slicing rows of ``exp_avg_sq`` reads only those bytes
(``state_rows``). Safetensors optimizer files (``optimizer.safetensors`` / ``optim.safetensors``,
keys ``state.<id>.<field>``, ``param_groups`` as JSON in ``__metadata__``) go through the same
interface. Anything else (DeepSpeed ZeRO shards, FSDP ``.distcp``, 8-bit, Adafactor's factored
moments, Lion, a file that needs a full unpickler) gives a one-line note and the run's
temperature falls back to the diffusivity D.

Optimizer state is keyed by position. Hugging Face Trainer puts the decay group first, then the
no-decay group, each in ``named_parameters()`` order (tied weights once). ``map_state_ids``
takes that order from the model built on the meta device from ``config.json`` when
``transformers`` is installed, else matches by the shape sequence where it is unambiguous, and
``verify_mapping`` always checks it: shapes equal, and the first moment anti-correlated with the
last displacement (an Adam/momentum step moves against its first moment).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.manifest import TensorInfo
from pipeline.ingest import remote

STATE_FILES = ("optimizer.pt", "optimizer.bin", "optimizer.safetensors", "optim.safetensors")
FALLBACK = "temperature falls back to D"
# a verified mapping: -corr(first moment, last displacement) above this many standard errors
MIN_CORRELATION_Z = 4.0
MIN_VERIFY_VALUES = 256  # tensors with fewer values are too small to verify by correlation
VERIFY_SAMPLE = 1 << 16  # leading values of each tensor used for the correlation check


class StateUnsupported(InputError):
    """Optimizer state that exists but cannot be used; the message ends with the fallback."""


def find_state_file(folder: str) -> tuple[str | None, str | None]:
    """(state file, None) of a checkpoint folder, or (None, note) for an unsupported layout, or
    (None, None) when the folder holds no optimizer state at all."""
    if remote.is_url(folder):  # torch.load needs a local file: a remote state is not fetched
        found = [e.path for e in remote.entries(folder) if e.name in STATE_FILES]
        why = "optimizer state of a remote series is not read (copy the series locally to use it)"
        return None, (f"{found[0]}: {why}; {FALLBACK}" if found else None)
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    for n in STATE_FILES:
        if n in names:
            return os.path.join(folder, n), None
    for n in sorted(names):
        path = os.path.join(folder, n)
        if n.endswith(".distcp") or (n.startswith("optimizer") and os.path.isdir(path)):
            return None, f"{path}: found an FSDP sharded optimizer state; {FALLBACK}"
        if n.startswith("global_step") and os.path.isdir(path):
            return None, f"{path}: found DeepSpeed ZeRO optimizer shards; {FALLBACK}"
    return None, None


@functools.lru_cache(maxsize=32)
def _load_cached(path: str, mtime_ns: int, size: int) -> dict:
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any refusal of the safe loader is the same answer
        why = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise StateUnsupported(
            path,
            f"cannot be read with torch.load(weights_only=True) ({why}); re-save it with "
            f"torch.save(optimizer.state_dict(), path) from plain tensors; {FALLBACK}",
        ) from None
    if not isinstance(raw, dict) or "state" not in raw or "param_groups" not in raw:
        keys = sorted(raw)[:6] if isinstance(raw, dict) else type(raw).__name__
        raise StateUnsupported(path, f"not an optimizer state_dict (found {keys}); {FALLBACK}")
    return raw


def _load_safetensors(path: str) -> dict:
    from safetensors import safe_open

    state: dict = {}
    handle = safe_open(path, framework="pt")  # kept open: the slices read from its mmap
    meta = handle.metadata() or {}
    for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
        m = re.fullmatch(r"state\.(\d+)\.(\w+)", key)
        if m is None:
            raise StateUnsupported(path, f"unrecognised key {key!r}; {FALLBACK}")
        piece = handle.get_slice(key)
        small = math.prod(piece.get_shape()) <= 1
        state.setdefault(int(m.group(1)), {})[m.group(2)] = (
            handle.get_tensor(key) if small else piece
        )
    try:
        groups = json.loads(meta.get("param_groups", ""))
    except ValueError:
        raise StateUnsupported(path, f"no param_groups JSON in __metadata__; {FALLBACK}") from None
    return {"state": state, "param_groups": groups, "_handle": handle}


def load_state(path: str) -> dict:
    """The optimizer state_dict, tensors memory-mapped (cached per path, size and mtime)."""
    st = os.stat(path)
    return _load_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size)


def optimizer_kind(sd: dict, path: str) -> str:
    """``adamw`` | ``adam`` | ``sgd`` | ``sgd_momentum`` | ``nesterov`` from param_groups and the
    state's fields; ``StateUnsupported`` for the optimizers and formats this reader refuses."""
    groups = sd["param_groups"]
    fields = set()
    for entry in sd["state"].values():
        fields |= set(entry)
    g = groups[0] if groups else {}
    if {"state1", "qmap1", "absmax1"} & fields:
        raise StateUnsupported(path, f"found 8-bit (bitsandbytes) optimizer state; {FALLBACK}")
    if {"exp_avg_sq_row", "exp_avg_sq_col"} & fields:
        raise StateUnsupported(path, f"found Adafactor factored moments; {FALLBACK}")
    adam_groups = not fields and "betas" in g and "eps" in g  # no update taken yet (step 0)
    if "exp_avg_sq" in fields or adam_groups:
        if g.get("amsgrad"):
            raise StateUnsupported(path, f"found AMSGrad (max of v, not v); {FALLBACK}")
        decoupled = g.get("decoupled_weight_decay")
        wd = max(float(x.get("weight_decay", 0.0)) for x in groups)
        return "adamw" if decoupled or (decoupled is None and wd > 0) else "adam"
    if "exp_avg" in fields and "betas" in g:
        raise StateUnsupported(path, f"found Lion (sign update, no second moment); {FALLBACK}")
    if "momentum" in g and "dampening" in g:
        if float(g.get("momentum", 0.0)) == 0.0:
            return "sgd"
        return "nesterov" if g.get("nesterov") else "sgd_momentum"
    raise StateUnsupported(
        path,
        f"unrecognised optimizer (group keys {sorted(g)[:8]}, state {sorted(fields)[:6]}); "
        f"{FALLBACK}",
    )


def _scalar(x) -> float:
    return float(x.item()) if hasattr(x, "item") else float(x)


def group_hyperparameters(sd: dict) -> list[dict]:
    """Per param group: lr, beta1, beta2, eps, weight_decay, momentum, dampening, nesterov and
    the state ids it holds (the true values at this checkpoint, not the launch arguments)."""
    out = []
    for g in sd["param_groups"]:
        betas = g.get("betas", (np.nan, np.nan))
        out.append(
            {
                "lr": _scalar(g.get("lr", np.nan)),
                "beta1": _scalar(betas[0]),
                "beta2": _scalar(betas[1]),
                "eps": _scalar(g.get("eps", np.nan)),
                "weight_decay": _scalar(g.get("weight_decay", 0.0)),
                "momentum": _scalar(g.get("momentum", 0.0)),
                "dampening": _scalar(g.get("dampening", 0.0)),
                "nesterov": bool(g.get("nesterov", False)),
                "params": [int(i) for i in g.get("params", [])],
            }
        )
    return out


def state_step(sd: dict) -> int | None:
    """Adam's update count (the bias-correction step) of the first parameter with state."""
    for entry in sd["state"].values():
        if "step" in entry:
            return int(round(_scalar(entry["step"])))
    return None


def state_shapes(sd: dict) -> dict[int, tuple[int, ...]]:
    """state id -> shape of its first moment / momentum buffer / second moment."""
    out = {}
    for i, entry in sd["state"].items():
        for key in ("exp_avg_sq", "exp_avg", "momentum_buffer"):
            if key in entry:
                t = entry[key]
                out[int(i)] = tuple(t.get_shape() if hasattr(t, "get_shape") else t.shape)
                break
    return out


def state_rows(path: str, state_id: int, field: str, start: int, stop: int, out=None):
    """Rows [start, stop) (first dimension) of one state tensor as float32, reading only those
    bytes of the memory-mapped file; ``out`` (float32, flat) receives them when given."""
    import torch

    t = load_state(path)["state"][state_id][field]
    if hasattr(t, "get_shape"):  # safetensors slice
        shape = t.get_shape()
        rows = t[start:stop] if shape else t[:]
    else:
        rows = t.reshape(t.shape[0], -1)[start:stop] if t.dim() else t.reshape(1)
    rows = rows.reshape(-1)
    if out is None:
        return rows.to(torch.float32).clone()
    return out.copy_(rows)


# --- which state id belongs to which tensor -------------------------------------------------


def _model_order(config_dir: str) -> tuple[list[str], set[str]] | None:
    """(named_parameters() names, Trainer's decay names) of the model built on the meta device
    from ``config_dir/config.json``; None without transformers or a usable config."""
    if not os.path.isfile(os.path.join(config_dir, "config.json")):
        return None
    try:
        import torch
        import transformers
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch) if arch else None
        if cls is None:
            return None
        with torch.device("meta"):
            model = cls(config)
        names = [n for n, _ in model.named_parameters()]
        decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
        return names, decay
    except Exception:  # noqa: BLE001 - optional path: any failure falls back to shapes
        return None


def _trainer_groups(order: list[str], decay: set[str]) -> list[list[str]]:
    return [[n for n in order if n in decay], [n for n in order if n not in decay]]


def _match_groups(candidates, groups, shapes, known) -> dict[str, int] | None:
    """name -> id when the named groups line up with the state's groups, shape by shape."""
    named = [[n for n in g if n in known] for g in candidates if g]
    ids = [g["params"] for g in groups if g["params"]]
    if [len(g) for g in named] != [len(g) for g in ids]:
        return None
    mapping = {}
    for names, group_ids in zip(named, ids):
        for n, i in zip(names, group_ids):
            if i in shapes and tuple(known[n].shape) != shapes[i]:
                return None
            mapping[n] = i
    return mapping


def _by_shapes(tensors: list[TensorInfo], groups, shapes, path) -> dict[str, int]:
    """Match ids to tensors by shape: each state shape must belong to exactly one tensor."""
    ids = [i for g in groups for i in g["params"]]
    by_shape: dict[tuple, list[str]] = {}
    for t in tensors:
        by_shape.setdefault(tuple(t.shape), []).append(t.name)
    mapping, ambiguous = {}, []
    for i in ids:
        names = by_shape.get(shapes.get(i), [])
        if len(names) == 1:
            mapping[names[0]] = i
        else:
            ambiguous.extend(names[:3])
    if ambiguous or len(ids) != len(tensors):
        who = ", ".join(sorted(set(ambiguous))[:4]) or f"{len(ids)} ids for {len(tensors)} tensors"
        raise StateUnsupported(
            path,
            f"cannot tell which optimizer state belongs to which tensor by shape ({who}); "
            f"install transformers so config.json gives the order; {FALLBACK}",
        )
    return mapping


def map_state_ids(sd: dict, path: str, tensors: list[TensorInfo], config_dir: str) -> tuple:
    """(name -> state id, source) for the run's tensors; ``StateUnsupported`` when ambiguous."""
    groups = group_hyperparameters(sd)
    shapes = state_shapes(sd)
    known = {t.name: t for t in tensors}
    model = _model_order(config_dir)
    if model is not None:
        order, decay = model
        for candidates, source in (
            (_trainer_groups(order, decay), "transformers (Trainer decay/no-decay order)"),
            ([order], "transformers (one group, named_parameters order)"),
        ):
            mapping = _match_groups(candidates, groups, shapes, known)
            if mapping is not None and len(mapping) == len(tensors):
                return mapping, source
    return _by_shapes(tensors, groups, shapes, path), "shapes (each shape unique)"


def _leading(values, n: int) -> np.ndarray:
    return np.asarray(values.reshape(-1)[:n], dtype=np.float64)


def _update_direction(sd: dict, path: str, state_id: int, rows: int, n: int) -> np.ndarray:
    """Leading values of the direction the optimizer steps along: Adam ``m / sqrt(v)``, SGD
    the momentum buffer (an update moves against it)."""
    entry = sd["state"][state_id]
    if "exp_avg" in entry:
        m = _leading(state_rows(path, state_id, "exp_avg", 0, rows), n)
        v = _leading(state_rows(path, state_id, "exp_avg_sq", 0, rows), n)
        return m / (np.sqrt(v) + 1e-30)
    return _leading(state_rows(path, state_id, "momentum_buffer", 0, rows), n)


def _z(direction: np.ndarray, move: np.ndarray) -> float:
    """-corr(direction, move) in standard errors (0 when either is constant)."""
    if np.std(direction) == 0 or np.std(move) == 0:
        return 0.0
    return -float(np.corrcoef(direction, move)[0, 1]) * math.sqrt(move.size)


def verify_mapping(
    mapping: dict[str, int], sd: dict, path: str, tensors, before: dict, after: dict
) -> dict:
    """Check the mapping on the last displacement ``after - before`` ({name: file} of the
    previous and this checkpoint): each tensor's update direction (Adam m/sqrt(v), SGD momentum)
    must anti-correlate with its displacement better than the state of any other tensor of the
    same shape does (by MIN_CORRELATION_Z standard errors: a swap is refused), and the tensors
    together must show the signal (mean z >= MIN_CORRELATION_Z). Returns counts: ``verified``
    (own z >= MIN_CORRELATION_Z), ``weak`` (below, but no other state fits better),
    ``too_small``, ``min_z``, ``swaps_tested``; ``StateUnsupported`` naming the tensors."""
    from pipeline.ingest.safetensors_io import read_rows

    usable = [
        t for t in tensors if t.n_params >= MIN_VERIFY_VALUES and mapping.get(t.name) in sd["state"]
    ]
    moves, dirs = {}, {}
    for t in usable:
        rows = min(t.rows, max(1, VERIFY_SAMPLE // t.row_elems)) if t.shape else 1
        n = rows * t.row_elems
        moves[t.name] = _leading(read_rows(after[t.name], t.name, 0, rows), n) - _leading(
            read_rows(before[t.name], t.name, 0, rows), n
        )
        dirs[t.name] = _update_direction(sd, path, mapping[t.name], rows, n)
    own = {name: _z(dirs[name], moves[name]) for name in moves}
    failed, swaps = [], 0
    for t in usable:
        for other in usable:
            if other is t or other.shape != t.shape:
                continue
            swaps += 1
            alt = _z(dirs[other.name], moves[t.name])
            if alt > max(own[t.name], 0.0) + MIN_CORRELATION_Z:
                failed.append(f"{t.name} (fits the state of {other.name})")
                break
    if not failed and own and np.mean(list(own.values())) < MIN_CORRELATION_Z:
        failed = [f"all {len(own)} tensors (mean z={np.mean(list(own.values())):.1f})"]
    if failed:
        raise StateUnsupported(
            path,
            f"the optimizer state does not follow the last displacement for "
            f"{', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}: mapping unverified; "
            f"{FALLBACK}",
        )
    verified = sum(z >= MIN_CORRELATION_Z for z in own.values())
    return {
        "verified": int(verified),
        "weak": len(own) - int(verified),
        "too_small": len(tensors) - len(usable),
        "min_z": min(own.values()) if own else None,
        "swaps_tested": swaps,
    }


def _grad_norms(run_dir: str) -> list[float]:
    """Logged gradient norms (Trainer's ``grad_norm``, before clipping) of the run's latest
    ``trainer_state.json``; empty when not logged."""
    found = [
        os.path.join(root, "trainer_state.json")
        for root, _, files in os.walk(run_dir)
        if "trainer_state.json" in files
    ]
    if not found:
        return []
    try:
        with open(max(found, key=os.path.getmtime), encoding="utf-8") as f:
            history = json.load(f).get("log_history", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [float(e["grad_norm"]) for e in history if isinstance(e.get("grad_norm"), int | float)]


def read_run_optimizer(run_dir: str, files: list[dict[str, str]], tensors: list[TensorInfo]):
    """(run optimizer record, per-checkpoint records) for a run whose checkpoints (step order)
    hold its tensors in ``files`` ({tensor: file} each); the state is looked for in each
    checkpoint's folder (Trainer layout), so a flat run (files directly in ``run_dir``) has none.

    Run record: ``kind`` (adamw | adam | sgd | sgd_momentum | nesterov | unknown), ``evidence``
    (state | trainer | none), ``note`` (why the temperature falls back to D, or ""),
    ``mapping`` {tensor: state id}, ``group`` {tensor: param group index}, ``mapping_source``,
    ``mapping_check`` and the logged ``grad_norm`` list. Checkpoint record: ``file``,
    ``step`` (the optimizer's update count) and ``groups`` (hyperparameters per param group).
    Never raises: an unusable state becomes the note."""
    folders = [remote.dirname(next(iter(f.values()))) for f in files]
    run_dir = remote.normalize(run_dir)
    # Trainer layout: checkpoint folders (not files loose in the run folder) with its state file
    trainer = any(
        remote.normalize(f) != run_dir and remote.isfile(remote.join(f, "trainer_state.json"))
        for f in folders
    )
    run = {"kind": "unknown", "evidence": "trainer" if trainer else "none", "note": ""}
    run["grad_norm"] = _grad_norms(run_dir)
    per_ckpt = [{} for _ in folders]
    states, notes = [], []
    for f in folders:
        flat = remote.normalize(f) == run_dir
        path, note = (None, None) if flat else find_state_file(f)
        states.append(path)
        if note:
            notes.append(note)
    if notes or not any(states):
        run["note"] = (
            notes[0]
            if notes
            else (
                f"{run_dir}: Hugging Face Trainer run without optimizer.pt (its default optimizer "
                f"is AdamW); {FALLBACK}"
                if trainer
                else ""
            )
        )
        return run, per_ckpt
    try:
        run.update(_describe(states, folders, files, tensors, per_ckpt))
    except InputError as exc:
        run["note"] = str(exc)
        per_ckpt = [{} for _ in folders]
    return run, per_ckpt


def _describe(files, folders, weights, tensors, per_ckpt) -> dict:
    """Kind, mapping and per-checkpoint hyperparameters from the state files (raises)."""
    last = max(i for i, f in enumerate(files) if f)
    sd = load_state(files[last])
    kind = optimizer_kind(sd, files[last])
    if kind == "sgd" and not sd["state"]:
        mapping, source, check = {}, "none needed (plain SGD keeps no state)", {}
    else:
        mapping, source = map_state_ids(sd, files[last], tensors, folders[last])
        check = {}
        if last > 0:
            check = verify_mapping(
                mapping, sd, files[last], tensors, weights[last - 1], weights[last]
            )
    group_of = {}
    for gi, g in enumerate(group_hyperparameters(sd)):
        for name, i in mapping.items():
            if i in g["params"]:
                group_of[name] = gi
    for j, f in enumerate(files):
        if f is None:
            continue
        s = load_state(f)
        if optimizer_kind(s, f) != kind:
            raise StateUnsupported(f, f"optimizer changes within the run; {FALLBACK}")
        groups = group_hyperparameters(s)
        for g in groups:
            g.pop("params")
        per_ckpt[j] = {"file": f, "step": state_step(s), "groups": groups}
    return {
        "kind": kind,
        "evidence": "state",
        "mapping": mapping,
        "group": group_of,
        "mapping_source": source,
        "mapping_check": check,
    }
