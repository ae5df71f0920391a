"""Per-step loss and learning rate of a run, and the activation function of each layer.

Logs, first found wins:
1. ``trainer_state.json`` (Hugging Face Trainer): the run folder's own, else the one inside the
   latest ``checkpoint-<step>/`` folder (it holds the whole history up to that step).
   ``log_history`` entries with ``step`` and ``loss`` and/or ``learning_rate`` are used;
   eval-only and summary entries (no ``loss``/``learning_rate``) are ignored.
2. ``log.csv``, then ``log.jsonl``: columns/keys ``step``, ``loss``, ``lr`` or ``learning_rate``.
3. Any other ``*.csv`` / ``*.jsonl`` in the run folder (name order) that has a ``step`` column
   and a ``loss`` or learning-rate column; files without those columns are not logs.

Entries of the same step are merged (later non-missing values win). A missing log gives an
empty ``TrainingLog`` (``source=None``); a log file that exists but cannot be parsed raises
``InputError`` naming it.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import os
import re

from pipeline.core.errors import InputError
from pipeline.core.manifest import TensorInfo, TrainingLog

STEP_KEYS = ("step", "global_step")
LOSS_KEYS = ("loss",)
LR_KEYS = ("learning_rate", "lr")
HF_ACT_KEYS = ("hidden_act", "activation_function", "hidden_activation")
_CKPT_DIR = re.compile(r"^checkpoint[-_](\d+)$")


def checkpoint_dirs(run_dir: str) -> list[tuple[int, str]]:
    """``checkpoint-<step>`` subfolders of ``run_dir`` as (step, path), latest last."""
    try:
        names = os.listdir(run_dir)
    except OSError:
        return []
    found = []
    for n in names:
        m = _CKPT_DIR.match(n)
        if m and os.path.isdir(os.path.join(run_dir, n)):
            found.append((int(m.group(1)), os.path.join(run_dir, n)))
    return sorted(found)


def _first_existing(run_dir: str, name: str) -> str | None:
    """``run_dir/name``, else the copy inside the latest checkpoint folder, else None."""
    top = os.path.join(run_dir, name)
    if os.path.isfile(top):
        return top
    for _, d in reversed(checkpoint_dirs(run_dir)):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    return None


def _number(path: str, where: str, value, integer: bool = False) -> float:
    """A float (NaN for missing/empty) from a JSON or CSV value; InputError if not numeric."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return math.nan
    if isinstance(value, bool):
        raise InputError(path, f"{where}: expected a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(path, f"{where}: expected a number, got {str(value)[:40]!r}") from None
    if integer and not (math.isfinite(x) and x == int(x) and x >= 0):
        raise InputError(path, f"{where}: step {str(value)[:40]!r} is not a non-negative integer")
    return x


def _get(entry: dict, keys) -> object:
    for k in keys:
        if k in entry:
            return entry[k]
    return None


def _merge(path: str, rows: list[tuple[str, dict]]) -> TrainingLog:
    """Rows (location, {normalized key: value}) -> TrainingLog sorted by step, same steps merged."""
    by_step: dict[int, list[float]] = {}
    for where, r in rows:
        step_raw = _get(r, STEP_KEYS)
        loss, lr = _get(r, LOSS_KEYS), _get(r, LR_KEYS)
        if step_raw is None or (loss is None and lr is None):
            continue
        step = _number(path, where, step_raw, integer=True)
        if math.isnan(step):
            continue
        vals = by_step.setdefault(int(step), [math.nan, math.nan])
        for i, v in enumerate((loss, lr)):
            x = _number(path, where, v)
            if not math.isnan(x):
                vals[i] = x
    steps = sorted(by_step)
    return TrainingLog(
        step=steps,
        loss=[by_step[s][0] for s in steps],
        learning_rate=[by_step[s][1] for s in steps],
        source=os.path.abspath(path),
    )


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(path, f"cannot parse JSON ({str(e)[:120]})") from None


def _trainer_state_rows(path: str) -> list[tuple[str, dict]]:
    obj = _load_json(path)
    hist = obj.get("log_history") if isinstance(obj, dict) else None
    if not isinstance(hist, list):
        raise InputError(path, "no 'log_history' list in trainer_state.json")
    return [(f"log_history[{i}]", e) for i, e in enumerate(hist) if isinstance(e, dict)]


def _csv_rows(path: str) -> list[tuple[str, dict]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [
                (
                    f"line {i + 2}",
                    {str(k).strip().lower(): v for k, v in r.items() if k is not None},
                )
                for i, r in enumerate(reader)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(path, f"cannot parse CSV ({str(e)[:120]})") from None
    return rows


def _jsonl_rows(path: str) -> list[tuple[str, dict]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError) as e:
                    raise InputError(path, f"line {i}: not valid JSON ({str(e)[:80]})") from None
                if not isinstance(obj, dict):
                    raise InputError(path, f"line {i}: not a JSON object")
                rows.append((f"line {i}", {str(k).strip().lower(): v for k, v in obj.items()}))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read ({str(e)[:120]})") from None
    return rows


def _rows(path: str) -> list[tuple[str, dict]]:
    if path.endswith(".json"):
        return _trainer_state_rows(path)
    return _csv_rows(path) if path.endswith(".csv") else _jsonl_rows(path)


def _is_log(rows: list[tuple[str, dict]]) -> bool:
    keys = set().union(*(r.keys() for _, r in rows)) if rows else set()
    return bool(keys & set(STEP_KEYS)) and bool(keys & set(LOSS_KEYS + LR_KEYS))


def find_log_files(run_dir: str) -> tuple[list[str], list[str]]:
    """(explicit, candidates): explicit log files (must parse) in priority order, then other
    ``*.csv`` / ``*.jsonl`` files of the run folder that are used only if they look like logs."""
    explicit = [
        p
        for p in (
            _first_existing(run_dir, "trainer_state.json"),
            os.path.join(run_dir, "log.csv"),
            os.path.join(run_dir, "log.jsonl"),
        )
        if p and os.path.isfile(p)
    ]
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        names = []
    others = [
        os.path.join(run_dir, n)
        for n in names
        if n.endswith((".csv", ".jsonl"))
        and n not in ("log.csv", "log.jsonl")
        and os.path.isfile(os.path.join(run_dir, n))
    ]
    return explicit, others


def read_training_log(run_dir) -> TrainingLog:
    """Loss and learning rate per step of the run in ``run_dir`` (see module docstring for the
    files tried). Empty ``TrainingLog`` (source None) when there is no log."""
    run_dir = os.path.abspath(os.fspath(run_dir))
    explicit, others = find_log_files(run_dir)
    if explicit:
        return _merge(explicit[0], _rows(explicit[0]))
    for p in others:
        rows = _rows(p)
        if _is_log(rows):
            return _merge(p, rows)
    return TrainingLog()


def _matches(name: str, key: str) -> bool:
    """Exact name, a dotted prefix (``layers.1`` covers ``layers.1.weight``, not ``layers.10``),
    or a glob pattern when the key contains ``*``/``?``/``[``."""
    if any(c in key for c in "*?["):
        return fnmatch.fnmatchcase(name, key)
    return name == key or name.startswith(key if key.endswith(".") else key + ".")


def config_path(run_dir) -> str | None:
    """The run's config.json: the run folder's own, else the latest checkpoint folder's."""
    return _first_existing(os.path.abspath(os.fspath(run_dir)), "config.json")


def _hf_activation(cfg: dict) -> str | None:
    for scope in (cfg, cfg.get("text_config")):
        if isinstance(scope, dict):
            for k in HF_ACT_KEYS:
                if isinstance(scope.get(k), str):
                    return scope[k]
    return None


def read_activations(run_dir, tensor_names) -> dict[str, str]:
    """{tensor name: activation} from the run's config.json (the run folder's, else the latest
    checkpoint folder's). ``thermoscope_activations`` ({name, dotted prefix or glob: activation};
    exact name, then longest key wins) has priority; otherwise the HF ``hidden_act`` /
    ``activation_function`` / ``hidden_activation`` applies to every weight tensor of 2 or more
    dimensions. ``tensor_names`` holds names or ``TensorInfo``; for bare names the dimension is
    unknown, so the HF default applies to names ending in ``weight``. Uncovered tensors are absent.
    """
    path = config_path(run_dir)
    if path is None:
        return {}
    cfg = _load_json(path)
    if not isinstance(cfg, dict):
        raise InputError(path, "config.json is not a JSON object")
    explicit = cfg.get("thermoscope_activations", {})
    if not isinstance(explicit, dict) or not all(isinstance(v, str) for v in explicit.values()):
        raise InputError(
            path, "'thermoscope_activations' must map tensor names or prefixes to strings"
        )
    default = _hf_activation(cfg)
    out = {}
    for t in tensor_names:
        name = t.name if isinstance(t, TensorInfo) else str(t)
        keys = [k for k in explicit if _matches(name, k)]
        if keys:
            out[name] = explicit[name] if name in explicit else explicit[max(keys, key=len)]
        elif default is not None and _is_matrix_weight(t):
            out[name] = default
    return out


def _is_matrix_weight(t) -> bool:
    if isinstance(t, TensorInfo):
        return len(t.shape) >= 2
    return str(t).endswith("weight")
