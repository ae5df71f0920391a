"""Scan a checkpoint folder into a ``Manifest``, reading safetensors headers only.

Layouts (see METHODS.md and the README's table of accepted inputs):
  (a) flat: ``*.safetensors`` files in one folder; the step is ``__metadata__["step"]`` when
      present, else the number after ``step`` in the file name, else its last integer;
  (b) checkpoint folders (``layouts.FOLDER_PATTERNS``: ``checkpoint-<step>/``, ``step_<N>/``,
      ``stepN-unsharded/``, ``global_stepN/``, ``checkpoint-N-epoch-M/``, Accelerate's
      ``checkpoints/checkpoint_<i>/``) holding ``model.safetensors``, any ``*.safetensors``,
      or shards listed by ``model.safetensors.index.json``; the step comes from the folder
      name, else ``trainer_state.json``, else ``__metadata__``;
  (c) sweep: a folder whose subfolders are runs in layout (a) or (b).
A folder that itself holds checkpoints is one run named after the folder. Folders may be URLs
(``remote``): the same code lists them and reads headers with byte-range requests. Weights in
another format (pickles, ZeRO shards, .distcp) are named with the command that converts them.

``scan`` never raises: it collects every problem as a ``Problem``. ``discover`` raises the first
one as ``InputError`` (or, with ``skip_bad``, drops the affected checkpoints and lists them in
``Manifest.skipped``); ``pipeline.validate`` turns the same problems into a table.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field

from pipeline.core.errors import InputError
from pipeline.core.manifest import Checkpoint, Manifest, Run, TensorInfo, TrainingLog
from pipeline.ingest import layouts, remote
from pipeline.ingest.lora import adapt_run, adapter_configs, load_base_model
from pipeline.ingest.optimizer_state import read_run_optimizer
from pipeline.ingest.safetensors_io import Header, is_float_dtype, load_header
from pipeline.ingest.training_log import (
    config_path,
    find_log_files,
    read_activations,
    read_training_log,
)

INDEX_NAME = "model.safetensors.index.json"
_STEP_IN_NAME = re.compile(r"step[^0-9a-z]*(\d+)", re.IGNORECASE)


def natural_key(s: str) -> list:
    """Sort key that orders embedded integers numerically: ``layers.2`` < ``layers.10``."""
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", s))]


def step_from_name(filename: str) -> int | None:
    """Step encoded in a checkpoint file name: the number after ``step`` if any, else the last
    integer (``epoch3-step100`` -> 100, ``ckpt-100`` -> 100, ``100.safetensors`` -> 100)."""
    stem = remote.basename(filename).removesuffix(".safetensors")
    found = _STEP_IN_NAME.findall(stem) or re.findall(r"\d+", stem)
    return int(found[-1]) if found else None


@dataclass
class Problem:
    """One reason a file, checkpoint or run cannot be used. ``scope``: "file" (a checkpoint file
    or folder, dropped; or a log/config file, ignored), "run" (a checkpoint that disagrees with
    the rest of its run, or a run left without checkpoints), "root" (nothing usable at all)."""

    path: str
    reason: str
    tensor: str | None = None
    scope: str = "file"

    def error(self) -> InputError:
        return InputError(self.path, self.reason, self.tensor)

    def text(self) -> str:
        return f"tensor '{self.tensor}': {self.reason}" if self.tensor else self.reason


@dataclass
class _Ckpt:
    """A checkpoint candidate: ``label`` is its file (flat) or folder; ``note`` says where a
    step not taken from the name came from."""

    step: int
    label: str
    tensors: dict[str, tuple[TensorInfo, str]]  # float tensors: name -> (info, file)
    header_hash: str
    note: str = ""


@dataclass
class Scan:
    """Everything ``scan`` found: usable runs, every problem, every file looked at."""

    root: str
    runs: list[Run] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    files: dict[str, str] = field(
        default_factory=dict
    )  # file looked at -> what it is / was used for
    ignored: list[tuple[str, str]] = field(default_factory=list)
    run_dirs: list[str] = field(default_factory=list)


def _listdir(d: str) -> list[remote.Entry]:
    return sorted(remote.entries(d), key=lambda e: natural_key(e.name))


def _flat_files(d: str) -> list[str]:
    """``*.safetensors`` entries of ``d``: files, and folders so that a folder named like a
    checkpoint is reported ("is a directory") rather than silently ignored."""
    return [e.path for e in _listdir(d) if e.name.endswith(".safetensors")]


def checkpoint_dirs(d: str) -> list[str]:
    """Checkpoint folders of run folder ``d`` in any layout of ``layouts.FOLDER_PATTERNS``
    (and ``checkpoint-<x>`` folders with a malformed step, to report them)."""
    return [p for _, p in layouts.checkpoint_folders(d)]


def has_checkpoints(d: str) -> bool:
    """True when folder ``d`` itself holds checkpoints (layout a or b)."""
    return bool(_flat_files(d) or checkpoint_dirs(d))


def find_runs(root: str) -> list[tuple[str, str]]:
    """(name, folder) of each run under ``root``: the root itself, or its run subfolders."""
    if has_checkpoints(root):
        return [(remote.basename(root) or root, root)]
    subs = [e for e in _listdir(root) if e.is_dir]
    return [(e.name, e.path) for e in subs if has_checkpoints(e.path)]


def _hash(headers: list[Header], extra: list[tuple[str, bytes]] = ()) -> str:
    h = hashlib.sha256()
    for name, raw in extra:
        h.update(remote.basename(name).encode() + b"\0" + raw)
    for hd in sorted(headers, key=lambda x: x.path):
        h.update(remote.basename(hd.path).encode() + b"\0")
        hd.digest_into(h)
    return h.hexdigest()


def _float_tensors(headers: list[Header], names: dict[str, str] | None = None) -> dict:
    """name -> (TensorInfo, file) for the float tensors; ``names`` restricts to an index's map."""
    out = {}
    for hd in headers:
        for n, (dtype, shape, _) in hd.tensors.items():
            if names is not None and names.get(n) != hd.path:
                continue
            if n in out:
                raise InputError(hd.path, f"also defined in {out[n][1]}", n)
            if is_float_dtype(dtype):
                out[n] = (TensorInfo(n, shape, dtype), hd.path)
    return out


def _metadata_step(hd: Header) -> int | None:
    raw = hd.metadata.get("step")
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise InputError(hd.path, f"__metadata__ step {raw[:40]!r} is not an integer") from None


def _flat_ckpt(path: str) -> _Ckpt:
    hd = load_header(path)
    step = _metadata_step(hd)
    if step is None:
        step = step_from_name(path)
    if step is None:
        raise InputError(path, "no step number in the file name or in __metadata__ 'step'")
    return _ckpt(step, path, [hd])


def _ckpt(step: int, label: str, headers: list[Header], names=None, extra=()) -> _Ckpt:
    tensors = _float_tensors(headers, names)
    if not tensors:
        raise InputError(label, "no floating-point tensors")
    return _Ckpt(step, label, tensors, _hash(headers, list(extra)))


def _shard_path(index: str, folder: str, fname, tensor: str) -> str:
    """Resolve a weight_map entry inside the checkpoint folder; refuse anything outside it."""
    if not isinstance(fname, str) or not fname:
        raise InputError(index, "weight_map entry is not a file name", tensor)
    parts = re.split(r"[\\/]", fname)
    if fname.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", fname):
        raise InputError(
            index, f"weight_map names {fname[:80]!r}, outside the checkpoint folder", tensor
        )
    path = remote.join(folder, *parts)
    if not remote.isfile(path):
        raise InputError(index, f"shard {fname[:80]!r} named in weight_map does not exist", tensor)
    return path


def _sharded(folder: str, index: str) -> tuple[list[Header], dict, bytes]:
    """Headers of the shards an index names, its tensor -> file map, and its raw bytes."""
    raw = remote.read_bytes(index, 100_000_000)
    try:
        wm = json.loads(raw.decode("utf-8")).get("weight_map")
    except (UnicodeDecodeError, ValueError, RecursionError, AttributeError) as e:
        raise InputError(index, f"cannot parse index JSON ({str(e)[:100]})") from None
    if not isinstance(wm, dict) or not wm:
        raise InputError(index, "no 'weight_map' object in the index")
    names = {n: _shard_path(index, folder, f, n) for n, f in wm.items()}
    headers = {p: load_header(p) for p in sorted(set(names.values()))}
    for n, p in names.items():
        if n not in headers[p].tensors:
            raise InputError(
                index, f"weight_map puts it in {remote.basename(p)}, which does not hold it", n
            )
    return list(headers.values()), names, raw


def _state_step(folder: str) -> int | None:
    """``global_step`` of the folder's trainer_state.json, if it has one."""
    path = remote.join(folder, "trainer_state.json")
    if not remote.isfile(path):
        return None
    try:
        step = json.loads(remote.read_bytes(path, 100_000_000)).get("global_step")
    except (UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        raise InputError(path, "cannot parse trainer_state.json") from None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _folder_step(folder: str, headers: list[Header]) -> tuple[int, str]:
    """(step, note) of a checkpoint folder: its name, else trainer_state.json, else
    ``__metadata__`` step, else (Accelerate) the save index, said so in the note."""
    layout, number = layouts.match_folder(remote.basename(folder))
    if not layouts.step_is_index(layout, remote.basename(remote.dirname(folder))):
        return number, ""
    step = _state_step(folder)
    if step is not None:
        return step, " (from trainer_state.json)"
    for hd in headers:
        if (step := _metadata_step(hd)) is not None:
            return step, " (from __metadata__)"
    return number, f" (Accelerate save index {number}: no step recorded, saves assumed in order)"


def _folder_ckpt(folder: str) -> tuple[_Ckpt, list[str]]:
    raw = layouts.malformed_folder(remote.basename(folder))
    if raw is not None:
        raise InputError(folder, f"step {raw[:40]!r} in the folder name is not an integer")
    index = remote.join(folder, INDEX_NAME)
    names, extra = None, []
    if remote.isfile(index):
        headers, names, raw = _sharded(folder, index)
        files, extra = [index, *(h.path for h in headers)], [(index, raw)]
    else:
        files = _flat_files(folder)
        main = remote.join(folder, "model.safetensors")
        files = [main] if main in files else files
        if not files:
            raise InputError(folder, _no_safetensors(folder, "checkpoint folder"))
        headers = [load_header(p) for p in files]
    step, note = _folder_step(folder, headers)
    ck = _ckpt(step, folder, headers, names, extra)
    ck.note = note
    return ck, files


def _no_safetensors(folder: str, what: str) -> str:
    """Why ``folder`` has no usable checkpoint: the foreign weights format found (one level
    down too, e.g. DeepSpeed's ``global_stepN/``) with its conversion command, or a plain
    'no .safetensors file'."""
    names = []
    for e in _listdir(folder):
        names += [f"{e.name}/{c.name}" for c in _listdir(e.path)] if e.is_dir else [e.name]
    return layouts.foreign_format(folder, names) or f"no .safetensors file in the {what}"


def _candidates(run_dir: str, out: Scan) -> list[_Ckpt]:
    """Checkpoint candidates of one run; per-file problems go to ``out.problems``."""
    found = []
    folders = checkpoint_dirs(run_dir)
    if folders:
        for f in _flat_files(run_dir):
            out.ignored.append((f, "loose file next to checkpoint folders; ignored"))
        jobs = [(d, _folder_ckpt, d) for d in folders]
    else:
        jobs = [(f, lambda p: (_flat_ckpt(p), [p]), f) for f in _flat_files(run_dir)]
    for label, fn, arg in jobs:
        try:
            ck, files = fn(arg)
            out.files.update({f: f"checkpoint step {ck.step}{ck.note}" for f in files})
            found.append(ck)
        except InputError as e:
            out.files.update(
                dict.fromkeys(
                    _folder_files(label) if remote.isdir(label) else [label], "checkpoint"
                )
            )
            out.problems.append(Problem(e.path, e.reason, e.tensor))
    return _drop_duplicate_steps(found, out)


def _folder_files(folder: str) -> list[str]:
    index = remote.join(folder, INDEX_NAME)
    return ([index] if remote.isfile(index) else []) + _flat_files(folder)


def _drop_duplicate_steps(found: list[_Ckpt], out: Scan) -> list[_Ckpt]:
    by_step: dict[int, list[_Ckpt]] = {}
    for c in found:
        by_step.setdefault(c.step, []).append(c)
    keep = []
    for step, group in sorted(by_step.items()):
        if len(group) == 1:
            keep.append(group[0])
            continue
        for c in group:
            others = ", ".join(o.label for o in group if o is not c)
            out.problems.append(
                Problem(c.label, f"duplicate step {step}: also the step of {others}")
            )
    return keep


def _signature(c: _Ckpt) -> tuple:
    return tuple(sorted((n, info.shape, info.dtype) for n, (info, _) in c.tensors.items()))


def _difference(c: _Ckpt, ref: _Ckpt) -> Problem | None:
    """First way checkpoint ``c`` differs from the reference one (+ how many more)."""
    issues = []
    for n in sorted(ref.tensors, key=natural_key):
        a = ref.tensors[n][0]
        if n not in c.tensors:
            issues.append((n, f"missing here but present in {ref.label} (renamed or removed?)"))
            continue
        b = c.tensors[n][0]
        if a.shape != b.shape:
            issues.append((n, f"shape changes from {a.shape} in {ref.label} to {b.shape}"))
        if a.dtype != b.dtype:
            issues.append((n, f"dtype changes from {a.dtype} in {ref.label} to {b.dtype}"))
    for n in sorted(set(c.tensors) - set(ref.tensors), key=natural_key):
        issues.append((n, f"not present in {ref.label} (renamed or added?)"))
    if not issues:
        return None
    more = f" (+{len(issues) - 1} more differences)" if len(issues) > 1 else ""
    return Problem(c.label, issues[0][1] + more, issues[0][0], scope="run")


def _consistent(cks: list[_Ckpt], out: Scan) -> list[_Ckpt]:
    """Keep checkpoints matching the most common tensor signature (ties: earliest step)."""
    if not cks:
        return []
    sigs = [_signature(c) for c in cks]
    counts = Counter(sigs)
    best = max(counts.values())
    ref = next(c for c, s in zip(cks, sigs) if counts[s] == best)
    keep = []
    for c in cks:
        p = _difference(c, ref)
        if p is None:
            keep.append(c)
        else:
            out.problems.append(p)
    return keep


def _run_extras(run_dir: str, tensors: list[TensorInfo], out: Scan) -> tuple[TrainingLog, dict]:
    explicit, others = find_log_files(run_dir)
    log, acts = TrainingLog(), {}
    try:
        log = read_training_log(run_dir)
    except InputError as e:
        out.problems.append(Problem(e.path, e.reason, e.tensor))
    for f in explicit + others:
        out.files[f] = (
            "training log" if f in (log.source, *explicit[:1]) else "not used as the training log"
        )
    try:
        acts = read_activations(run_dir, tensors)
        out.files.update({p: "activations config" for p in [config_path(run_dir)] if p})
    except InputError as e:
        out.problems.append(Problem(e.path, e.reason, e.tensor))
    return log, acts


def _scan_run(name: str, run_dir: str, out: Scan, base=None, lora_raw: bool = False) -> None:
    cks = _consistent(_candidates(run_dir, out), out)
    if not cks:
        out.problems.append(Problem(run_dir, "no usable checkpoints in this run", scope="run"))
        return
    ref = cks[0].tensors
    tensors = [ref[n][0] for n in sorted(ref, key=natural_key)]
    log, acts = _run_extras(run_dir, tensors, out)
    checkpoints = [
        Checkpoint(c.step, {t.name: c.tensors[t.name][1] for t in tensors}, c.header_hash)
        for c in cks
    ]
    optimizer, states = read_run_optimizer(run_dir, [c.files for c in checkpoints], tensors)
    checkpoints = [_with_state(c, s, out) for c, s in zip(checkpoints, states)]
    run = Run(name, run_dir, checkpoints, tensors, log, acts, optimizer)
    try:  # a PEFT adapter series: one layer per adapted module
        run = adapt_run(run, base, lora_raw)
    except InputError as e:
        out.problems.append(Problem(e.path, e.reason, e.tensor))
        return
    out.files.update(dict.fromkeys(filter(None, adapter_configs(run)), "LoRA adapter config"))
    out.runs.append(run)


def _with_state(c: Checkpoint, state: dict, out: Scan) -> Checkpoint:
    """The checkpoint with its optimizer state record; the state file's size and mtime join
    its identity (the measure cache then remeasures when the state changes)."""
    if not state:
        return c
    size, version = remote.stat(state["file"])
    out.files[state["file"]] = f"optimizer state step {c.step}"
    ident = f"{c.header_hash}|{size}|{version}".encode()
    return Checkpoint(c.step, c.files, hashlib.sha256(ident).hexdigest(), state)


def scan(path, base=None, lora_raw: bool = False) -> Scan:
    """Collect runs, problems and candidate files under ``path`` without raising. ``base``
    (``lora.BaseModel``) and ``lora_raw``: the layers of a LoRA adapter series (``discover``)."""
    remote.forget()
    root = remote.normalize(path)
    out = Scan(root)
    try:
        if not remote.isdir(root):
            why = (
                "is a file, not a folder of checkpoints"
                if remote.exists(root)
                else "no such folder"
            )
            out.problems.append(Problem(root, why, scope="root"))
            return out
        runs = find_runs(root)
    except InputError as e:  # a remote folder that cannot be listed
        why = e.reason if e.path == root else f"{e.path}: {e.reason}"
        out.problems.append(Problem(root, why, scope="root"))
        return out
    if not runs:
        foreign = layouts.foreign_format(root, [e.name for e in _listdir(root) if not e.is_dir])
        out.problems.append(
            Problem(
                root,
                foreign
                or "no checkpoints found (expected *.safetensors files or checkpoint folders "
                "such as checkpoint-<step>/ or step_<N>/, here or in run subfolders)",
                scope="root",
            )
        )
    for name, d in runs:
        out.run_dirs.append(d)
        _scan_run(name, d, out, base, lora_raw)
    return out


def discover(path, skip_bad: bool = False, base_model=None, lora_raw: bool = False) -> Manifest:
    """Manifest of every run under ``path`` (headers and logs only).

    A run of PEFT adapter checkpoints (``adapter_config.json`` beside each
    ``adapter_model.safetensors``) gets one layer per adapted module (``lora.adapt_run``):
    W0 + dW with ``base_model`` (the base model's safetensors file or folder), else dW alone;
    ``lora_raw`` adds the raw A and B.

    Raises ``InputError`` for the first problem found (the message says how many more there
    are). With ``skip_bad=True``, unusable checkpoints (bad header, duplicate or unparseable
    step, tensors that differ from the run's other checkpoints) and unparseable logs are listed
    in ``Manifest.skipped`` as (path, reason) and left out; it still raises when nothing usable
    remains.
    """
    base = load_base_model(base_model) if base_model else None
    s = scan(path, base, lora_raw)
    if s.problems and (not skip_bad or not s.runs):
        first = s.problems[0]
        more = len(s.problems) - 1
        suffix = f" (+{more} more problems; `thermoscope check` lists them all)" if more else ""
        raise InputError(first.path, first.reason + suffix, first.tensor)
    skipped = [(p.path, p.text()) for p in s.problems] + s.ignored
    return Manifest(root=s.root, runs=s.runs, skipped=skipped)
