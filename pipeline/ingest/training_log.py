"""Per-step loss and learning rate of a run, and the activation function of each layer.

Logs, first usable source wins (``read_training_log``):
1. ``trainer_state.json`` (Hugging Face Trainer): the run folder's own, else the one inside the
   latest ``checkpoint-<step>/`` folder (it holds the whole history up to that step).
2. ``log.csv``, then ``log.jsonl`` in the run folder.
3. Lightning CSVLogger: ``lightning_logs/version_<n>/metrics.csv`` (highest version).
4. DVCLive: ``dvclive/plots/metrics/**/*.tsv`` (one file per metric, columns ``step`` and the
   value; the metric is its path, e.g. ``train/loss``), else the one-step ``dvclive/metrics.json``.
5. TensorBoard event files (``*tfevents*`` anywhere under the run folder), scalar summaries read
   with tensorboard's ``EventAccumulator``; files in path order, later files win a shared step.
6. Any other ``*.csv`` / ``*.jsonl`` in the run folder (name order).

The loss and learning-rate keys of a source are chosen from the tables ``LOSS_KEYS`` /
``LR_KEYS`` (case-insensitive, first listed name present in the source wins; Lightning's
``LearningRateMonitor`` names ``lr-<Optimizer>`` are matched by pattern). A source with neither
a loss nor an LR key is not a log and the next one is tried. The chosen file and keys are kept
in ``TrainingLog`` (``source``, ``loss_key``, ``lr_key``) and shown in the report.

Entries of the same step are merged (later non-missing values win). A missing log gives an
empty ``TrainingLog`` (``source=None``); a log file that exists but cannot be parsed raises
``InputError`` naming it.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import re

from pipeline.core.errors import InputError
from pipeline.core.manifest import TensorInfo, TrainingLog
from pipeline.ingest import layouts, remote
from pipeline.ingest.architecture import activation_after

STEP_KEYS = ("step", "global_step", "trainer/global_step")
# Names of the training loss and learning rate in the loggers we know, in priority order.
# HF Trainer: loss / learning_rate (trainer_state, DVCLive), train/loss / train/learning_rate
# (TensorBoard); Lightning: train_loss (+ _step when logged on step and epoch), lr-<Optimizer>.
# Not listed: HF's end-of-training average loss (train/train_loss in TensorBoard); in HF's
# DVCLive log that average is train/loss beside the per-step loss, which wins being listed first.
LOSS_KEYS = (
    "loss",
    "train_loss",
    "train/loss",
    "train_loss_step",
    "train/loss_step",
    "training_loss",
    "loss_step",
)
LR_KEYS = (
    "learning_rate",
    "lr",
    "train/learning_rate",
    "train/lr",
    "lr-adamw",
    "lr-adam",
    "lr-sgd",
    "lr-adamw/pg1",
    "lr-adam/pg1",
    "lr-sgd/pg1",
)
_LR_MONITOR = re.compile(r"^lr-[a-z0-9_]+(/pg1)?$")  # Lightning LearningRateMonitor, any optimizer
HF_ACT_KEYS = ("hidden_act", "activation_function", "hidden_activation")
_LIGHTNING_VERSION = re.compile(r"^version_(\d+)$")
MAX_LOG_BYTES = 1 << 30  # a log or config larger than this is refused, not read


def checkpoint_dirs(run_dir: str) -> list[tuple[int, str]]:
    """Checkpoint subfolders of ``run_dir`` (any layout of ``layouts``) as (number, path),
    latest last."""
    return [(n, p) for n, p in layouts.checkpoint_folders(run_dir) if n is not None]


def _first_existing(run_dir: str, name: str) -> str | None:
    """``run_dir/name``, else the copy inside the latest checkpoint folder, else None."""
    top = remote.join(run_dir, name)
    if remote.isfile(top):
        return top
    for _, d in reversed(checkpoint_dirs(run_dir)):
        p = remote.join(d, name)
        if remote.isfile(p):
            return p
    return None


def _text(path: str, what: str) -> str:
    """The whole of a small text file, local or remote (``InputError`` naming it otherwise)."""
    try:
        return remote.read_bytes(path, MAX_LOG_BYTES).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, f"cannot parse {what} ({str(e)[:120]})") from None


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


def _pick(present: dict[str, str], table, pattern: re.Pattern | None = None) -> str | None:
    """The source's own spelling of the first ``table`` name it has (``present`` maps lower-case
    names to the source's spelling), else of the first name matching ``pattern``."""
    for k in table:
        if k in present:
            return present[k]
    if pattern is not None:
        for low in sorted(present):
            if pattern.match(low):
                return present[low]
    return None


def _merge(path: str, rows: list[tuple[str, dict]]) -> TrainingLog | None:
    """Rows (location, {key: value}) -> TrainingLog sorted by step, same steps merged, with the
    keys chosen from the name tables; None when the rows have no step or no loss/LR key."""
    present: dict[str, str] = {}
    for _, r in rows:
        for k in r:
            present.setdefault(k.lower(), k)
    step_key = _pick(present, STEP_KEYS)
    loss_key, lr_key = _pick(present, LOSS_KEYS), _pick(present, LR_KEYS, _LR_MONITOR)
    if step_key is None or (loss_key is None and lr_key is None):
        return None
    by_step: dict[int, list[float]] = {}
    for where, r in rows:
        loss, lr = r.get(loss_key), r.get(lr_key)
        if r.get(step_key) is None or (loss is None and lr is None):
            continue
        step = _number(path, where, r[step_key], integer=True)
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
        source=remote.normalize(path),
        loss_key=loss_key,
        lr_key=lr_key,
    )


def _load_json(path: str):
    text = _text(path, "JSON")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InputError(path, f"cannot parse JSON ({str(e)[:120]})") from None


def _trainer_state_rows(path: str) -> list[tuple[str, dict]]:
    obj = _load_json(path)
    hist = obj.get("log_history") if isinstance(obj, dict) else None
    if not isinstance(hist, list):
        raise InputError(path, "no 'log_history' list in trainer_state.json")
    return [(f"log_history[{i}]", e) for i, e in enumerate(hist) if isinstance(e, dict)]


def _csv_rows(path: str, delimiter: str = ",") -> list[tuple[str, dict]]:
    text = _text(path, "CSV")
    try:
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            rows = [
                (f"line {i + 2}", {str(k).strip(): v for k, v in r.items() if k is not None})
                for i, r in enumerate(reader)
            ]
    except csv.Error as e:
        raise InputError(path, f"cannot parse CSV ({str(e)[:120]})") from None
    return rows


def _jsonl_rows(path: str) -> list[tuple[str, dict]]:
    rows = []
    for i, line in enumerate(_text(path, "JSONL").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise InputError(path, f"line {i}: not valid JSON ({str(e)[:80]})") from None
        if not isinstance(obj, dict):
            raise InputError(path, f"line {i}: not a JSON object")
        rows.append((f"line {i}", {str(k).strip(): v for k, v in obj.items()}))
    return rows


def _flatten(obj: dict, prefix: str = "") -> dict:
    """Nested JSON objects -> one level with ``/``-joined keys (DVCLive's metric names)."""
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _dvclive_rows(live_dir: str) -> list[tuple[str, dict]]:
    """One row per (metric file, line): {"step": s, "<metric path>": value}. DVCLive writes each
    metric to ``plots/metrics/<name>.tsv`` with columns ``step`` (+ ``timestamp``) and the
    value; without plots, ``metrics.json`` holds the latest value of each metric at ``step``."""
    plots = os.path.join(live_dir, "plots", "metrics")
    rows = []
    for dirpath, _, names in sorted(os.walk(plots)):
        for n in sorted(x for x in names if x.endswith(".tsv")):
            path = os.path.join(dirpath, n)
            metric = os.path.relpath(path, plots)[: -len(".tsv")].replace(os.sep, "/")
            for where, r in _csv_rows(path, delimiter="\t"):
                value_cols = [k for k in r if k not in ("step", "timestamp")]
                if "step" not in r or len(value_cols) != 1:
                    raise InputError(path, f"{where}: expected columns step and one value column")
                rows.append((f"{path} {where}", {"step": r["step"], metric: r[value_cols[0]]}))
    summary = os.path.join(live_dir, "metrics.json")
    if not rows and os.path.isfile(summary):
        obj = _load_json(summary)
        if not isinstance(obj, dict):
            raise InputError(summary, "metrics.json is not a JSON object")
        rows.append(("metrics.json", _flatten(obj)))
    return rows


def tensorboard_files(folder: str) -> list[str]:
    """TensorBoard event files (``*tfevents*``) anywhere under ``folder``, in path order."""
    if os.path.isfile(folder):
        return [folder]
    found = []
    for dirpath, _, names in os.walk(folder):
        found += [os.path.join(dirpath, n) for n in names if "tfevents" in n]
    return sorted(found)


def _tensorboard_rows(source: str) -> list[tuple[str, dict]]:
    """One row per scalar event: {"step": step, tag: value}, files in path order. Read with
    tensorboard's EventAccumulator (all events kept, no sampling); a non-empty file in which it
    finds no event is not an event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = []
    for path in tensorboard_files(source):
        if os.path.getsize(path) == 0:
            continue
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        try:
            acc.Reload()
            acc.FirstEventTimestamp()
        except ValueError:
            raise InputError(path, "no readable TensorBoard event in this file") from None
        except Exception as e:  # the reader's own errors (corrupt records, I/O)
            raise InputError(path, f"cannot read TensorBoard events ({str(e)[:120]})") from None
        for tag in acc.Tags()["scalars"]:
            for i, ev in enumerate(acc.Scalars(tag)):
                rows.append((f"{path} {tag}[{i}]", {"step": ev.step, tag: ev.value}))
    return rows


def _rows(path: str) -> list[tuple[str, dict]]:
    """The rows of one log source, by its kind (file name, or folder for DVCLive/TensorBoard)."""
    if os.path.basename(path) == "dvclive":
        return _dvclive_rows(path)
    if path.endswith(".json"):
        return _trainer_state_rows(path)
    if path.endswith(".csv"):
        return _csv_rows(path)
    if path.endswith(".jsonl"):
        return _jsonl_rows(path)
    return _tensorboard_rows(path)


def _lightning_csv(run_dir: str) -> str | None:
    """``lightning_logs/version_<n>/metrics.csv`` of the highest version, if any."""
    logs = os.path.join(run_dir, "lightning_logs")
    try:
        versions = [
            (int(m.group(1)), n) for n in os.listdir(logs) if (m := _LIGHTNING_VERSION.match(n))
        ]
    except OSError:
        return None
    for _, n in sorted(versions, reverse=True):
        p = os.path.join(logs, n, "metrics.csv")
        if os.path.isfile(p):
            return p
    return None


def _tensorboard_source(run_dir: str) -> str | None:
    """The event file, or the folder holding all event files, of the run; None without any."""
    files = tensorboard_files(run_dir)
    if not files:
        return None
    return files[0] if len(files) == 1 else os.path.commonpath(files)


def find_log_files(run_dir: str) -> tuple[list[str], list[str]]:
    """(explicit, candidates): log sources found by name or layout (they must parse) in priority
    order, then other ``*.csv`` / ``*.jsonl`` files of the run folder, used only if they hold a
    step and a known loss or LR column. DVCLive and TensorBoard sources are folders."""
    live = os.path.join(run_dir, "dvclive")
    explicit = [
        p
        for p in (
            _first_existing(run_dir, "trainer_state.json"),
            remote.join(run_dir, "log.csv"),
            remote.join(run_dir, "log.jsonl"),
            _lightning_csv(run_dir),
            live if os.path.isdir(live) else None,
            _tensorboard_source(run_dir),
        )
        if p and remote.exists(p)
    ]
    others = [
        e.path
        for e in sorted(remote.entries(run_dir), key=lambda e: e.name)
        if e.name.endswith((".csv", ".jsonl"))
        and e.name not in ("log.csv", "log.jsonl")
        and not e.is_dir
    ]
    return explicit, others


def read_training_log(run_dir) -> TrainingLog:
    """Loss and learning rate per step of the run in ``run_dir`` from the first source that has
    a step and a known loss or LR key (see the module docstring for the order). Empty
    ``TrainingLog`` (source None) when there is none."""
    run_dir = remote.normalize(run_dir)
    explicit, others = find_log_files(run_dir)
    for p in explicit + others:
        log = _merge(p, _rows(p))
        if log is not None:
            return log
    return TrainingLog()


def _matches(name: str, key: str) -> bool:
    """Exact name, a dotted prefix (``layers.1`` covers ``layers.1.weight``, not ``layers.10``),
    or a glob pattern when the key contains ``*``/``?``/``[``."""
    if any(c in key for c in "*?["):
        return fnmatch.fnmatchcase(name, key)
    return name == key or name.startswith(key if key.endswith(".") else key + ".")


def config_path(run_dir) -> str | None:
    """The run's config.json: the run folder's own, else the latest checkpoint folder's."""
    return _first_existing(remote.normalize(run_dir), "config.json")


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
    ``activation_function`` / ``hidden_activation`` applies to the weight tensors of 2 or more
    dimensions that feed it, by the rules of ``architecture.activation_after`` (MLP input
    projections; "none" for attention, output projections, embeddings, heads). ``tensor_names``
    holds names or ``TensorInfo``; for bare names the dimension is unknown, so names ending in
    ``weight`` count as matrices. Uncovered tensors are absent (activation unknown).
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
        elif default is not None:
            act = activation_after(name, _is_matrix_weight(t), default)
            if act is not None:
                out[name] = act
    return out


def _is_matrix_weight(t) -> bool:
    if isinstance(t, TensorInfo):
        return len(t.shape) >= 2
    return str(t).endswith("weight")
