"""``thermoscope check``: a verdict for every candidate file, without computing anything.

Runs every validation of discovery (headers, steps, shard indexes, cross-checkpoint tensor
consistency, logs, config) and reports all problems instead of stopping at the first. Then
the pre-flight (``plan``): the bytes the measurement will read (after ``--steps``/``--layers``)
and an estimated time, at a rate measured on the series itself when it is remote.
"""

from __future__ import annotations

import math
import os
import statistics
import time

from pipeline.core.errors import InputError
from pipeline.core.manifest import ADAM_KINDS, SGD_KINDS
from pipeline.core.reasons import TEMPERATURE_REASONS
from pipeline.core.reasons import TemperatureReason as R
from pipeline.core.windows import checkpoint_windows, spacing_refusal
from pipeline.estimators.preconditioned import clip_fraction, clip_refusal, momentum_offset_steps
from pipeline.ingest import remote, selection
from pipeline.ingest.discovery import Problem, Scan, scan
from pipeline.settings import ThermoSettings

#: local read rate of the default measurement on the 2-core test machine (README), bytes/s
LOCAL_RATE = (0.47e9, 0.76e9)
_PROBE_BYTES = 4 << 20  # the timed remote read of the pre-flight


def _row(path: str, verdict: str, reason: str) -> dict:
    return {"path": path, "verdict": verdict, "reason": reason}


def _folder_rows(s, problems: list[Problem]) -> list[dict]:
    """One row per run folder: its cross-checkpoint/log problems, or a summary when clean."""
    rows = []
    runs = {r.path: r for r in s.runs}
    for d in s.run_dirs:
        mine = [p for p in problems if p.path == d or p.path.startswith(d + os.sep)]
        if mine:
            rows += [
                _row(
                    d,
                    "error",
                    f"{os.path.relpath(p.path, d)}: {p.text()}" if p.path != d else p.text(),
                )
                for p in mine
            ]
        elif d in runs:
            r = runs[d]
            rows.append(
                _row(
                    d,
                    "ok",
                    f"run '{r.name}': {len(r.checkpoints)} checkpoints "
                    f"(steps {r.steps[0]}..{r.steps[-1]}), {len(r.tensors)} tensors",
                )
            )
    return rows


def check(path) -> list[dict]:
    """Rows {path, verdict: "ok"|"error", reason} for every candidate file under ``path``
    (safetensors files, shard indexes, logs, config.json), then folder-level rows for each run
    (cross-checkpoint problems such as changed shapes or missing tensors, bad logs) and for the
    root when nothing usable is found. Never raises for bad input."""
    return rows_of(scan(path))


def check_and_plan(
    path, steps=None, layers=None, thermo: ThermoSettings | None = None
) -> tuple[list[dict], dict | None]:
    """``check``'s rows and the pre-flight ``plan`` of what is usable (None when nothing is),
    with the identifiability ``forecast`` of the selected runs in ``plan["forecast"]``."""
    s = scan(path)
    if not s.runs:
        return rows_of(s), None
    out = plan(s, steps, layers)
    out["forecast"] = forecast([selection.select_run(r, steps, layers) for r in s.runs], thermo)
    return rows_of(s), out


def _probe(s: Scan, runs) -> tuple[float, str]:
    """(bytes/s, how it was obtained) for a remote series: one timed, uncached range read of
    the last (up to) 4 MiB of the first selected checkpoint's file holding its largest tensor."""
    run = runs[0]
    t = max(run.tensors, key=lambda t: t.n_params * selection.DTYPES[t.dtype].itemsize)
    path = run.checkpoints[0].files[t.name]
    size, _ = remote.stat(path)
    n = min(_PROBE_BYTES, size)
    started = time.perf_counter()
    remote.read_uncached(path, size - n, size)
    seconds = max(time.perf_counter() - started, 1e-6)
    return n / seconds, f"measured now: {n} bytes in {seconds:.3f} s from {path}"


def plan(s: Scan, steps=None, layers=None) -> dict:
    """Bytes to read and the estimated time: ``bytes``, ``series_bytes`` (all tensors of all
    checkpoints), ``seconds`` (low, high), ``rate`` (bytes/s, low and high) and ``rate_from``.
    Local: the README's measured range; remote: one timed range read (single stream; parallel
    workers may be faster, the measurement itself slower)."""
    runs = [selection.select_run(r, steps, layers) for r in s.runs]
    out = {"bytes": selection.bytes_to_read(runs), "series_bytes": selection.bytes_to_read(s.runs)}
    if remote.is_url(s.root):
        try:
            rate, how = _probe(s, runs)
        except InputError as e:  # the estimate is lost, not the check
            rate, how = float("nan"), f"probe failed: {e}"
        out["rate"], out["rate_from"] = (rate, rate), how
    else:
        out["rate"], out["rate_from"] = LOCAL_RATE, "the README's local range (2 cores)"
    out["seconds"] = (out["bytes"] / out["rate"][1], out["bytes"] / out["rate"][0])
    return out


def _optimizer_refusal(run, max_grad_norm: float | None) -> str:
    """Why the optimizer relation will refuse a loss-unit T before measuring ('' if it will
    not): an adaptive optimizer without its state, an optimizer that cannot be told, or
    checkpoints too close for the state's momentum, or SGD clipped at too many logged steps
    (the thermo relation's rules, from the same shared functions)."""
    kind = run.optimizer.get("kind", "unknown")
    evidence = run.optimizer.get("evidence", "none")
    if evidence == "none":
        return ""  # no optimizer files: plain SGD assumed
    if kind in ADAM_KINDS and evidence != "state":
        return f"{kind} without its saved state"
    if kind == "unknown":
        return "optimizer unknown"
    if kind not in ADAM_KINDS + SGD_KINDS:
        return ""
    offset = momentum_offset_steps(kind, _state_momentum(run, kind))
    refusal = spacing_refusal(run.steps, offset)
    if kind in SGD_KINDS:  # the thermo relation: clipping outranks the spacing
        clipped = clip_fraction(run.optimizer.get("grad_norm") or [], max_grad_norm)
        refusal = clip_refusal(clipped, max_grad_norm) or refusal
    return refusal


def _state_momentum(run, kind: str) -> float:
    """The median momentum in the run's saved optimizer states (Adam: beta1; 0 when unread)."""
    key = "beta1" if kind in ADAM_KINDS else "momentum"
    values = [
        g.get(key, math.nan)
        for c in run.checkpoints
        for g in ((c.optimizer or {}).get("groups") or [])[:1]
    ]
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(statistics.median(values)) if values else 0.0


def forecast(runs, thermo: ThermoSettings | None = None, max_lag: int = 8) -> list[dict]:
    """Per run, before measuring: how many (layer, step) cells can get a temperature and
    why the others cannot (``TemperatureReason`` codes decidable from the manifest: too few
    checkpoints for a window, no LR log, the optimizer relation). Cells can still be refused
    after measuring (spacing, rounding, no diffusion signal)."""
    thermo = thermo or ThermoSettings()
    window = min(thermo.temperature_window, max_lag)
    out = []
    for run in runs:
        n_layers = len(run.tensors)  # every tensor is measured (the report counts the same)
        starts, _ = checkpoint_windows(
            len(run.steps), window, min(thermo.temperature_min_window, window)
        )
        has_window = int((starts >= 0).sum()) * n_layers
        counts = {R.TOO_FEW_CHECKPOINTS: len(run.steps) * n_layers - has_window}
        lrs = [x for x in run.log.learning_rate if x is not None and math.isfinite(x) and x > 0]
        refusal = _optimizer_refusal(run, thermo.max_grad_norm)
        blocked = R.OPTIMIZER_STATE_MISSING if refusal else None if lrs else R.NO_LR_LOG
        if blocked is not None:
            counts[blocked] = has_window
        possible = has_window - (has_window if blocked is not None else 0)
        out.append(
            {
                "run": run.name,
                "cells": len(run.steps) * n_layers,
                "possible": possible,
                "refused": {_reason_text(k, refusal): v for k, v in counts.items() if v},
                "optimizer": refusal,
            }
        )
    return out


def _reason_text(code, refusal: str) -> str:
    """A forecast reason: the optimizer refusal's own sentence for code 4, else the table's."""
    if code == R.OPTIMIZER_STATE_MISSING and refusal:
        return f"optimizer relation refused: {refusal}"
    return TEMPERATURE_REASONS[int(code)]


def format_forecast(rows: list[dict]) -> str:
    """One line per run: the cells that can get a temperature, and why the others cannot."""
    lines = []
    for r in rows:
        why = "; ".join(f"{text} ({n} cells)" for text, n in r["refused"].items())
        share = r["possible"] / max(r["cells"], 1)
        lines.append(
            f"identifiable at most: run '{r['run']}' {r['possible']} of {r['cells']} (layer, step) "
            f"cells ({share:.0%})" + (f"; refused before measuring: {why}" if why else "")
        )
    if lines:
        lines.append(
            "after measuring, cells can still be refused: spacing longer than a layer's "
            "relaxation time, rounding-limited, no resolvable diffusion (the report says which)"
        )
    return "\n".join(lines)


def format_plan(p: dict) -> str:
    """The pre-flight as two lines."""
    lo, hi = p["seconds"]
    rate = " - ".join(f"{r / 1e6:.1f}" for r in sorted(set(p["rate"])))
    span = f"{lo:.3g} s" if lo == hi else f"{lo:.3g}-{hi:.3g} s"
    return (
        f"pre-flight: {p['bytes']} bytes to read ({p['bytes'] / max(p['series_bytes'], 1):.1%} "
        f"of the series' {p['series_bytes']} bytes); estimated {span} of reading at {rate} MB/s "
        "(analyze adds its Dask cluster's start-up, seconds)\n"
        f"rate: {p['rate_from']}"
    )


def rows_of(s: Scan) -> list[dict]:
    """The verdict rows of one scan (see ``check``)."""
    by_path: dict[str, list[str]] = {}
    for p in s.problems:
        if p.scope == "file":
            by_path.setdefault(p.path, []).append(p.text())
    rows = []
    for f, what in s.files.items():
        errs = by_path.pop(f, [])
        rows.append(_row(f, "error", "; ".join(errs)) if errs else _row(f, "ok", what))
    rows += [_row(p, "error", "; ".join(errs)) for p, errs in by_path.items()]
    rows += [_row(p, "ok", reason) for p, reason in s.ignored]
    rows += _folder_rows(s, [p for p in s.problems if p.scope == "run"])
    rows += [_row(p.path, "error", p.text()) for p in s.problems if p.scope == "root"]
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table (verdict, path, reason), paths shown relative to their common folder,
    with a final count line."""
    if not rows:
        return "no files checked"
    paths = [r["path"] for r in rows]
    if any(remote.is_url(p) for p in paths):
        base = os.path.commonprefix(paths).rsplit("/", 1)[0]
        shown = [p[len(base) + 1 :] or p for p in paths]
    else:
        base = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
        base = base if os.path.isdir(base) else os.path.dirname(base)
        shown = [os.path.relpath(p, base) if base else p for p in paths]
    width = max(len(s) for s in shown)
    lines = [f"{'verdict':7}  {'path':{width}}  reason", f"{'-' * 7}  {'-' * width}  {'-' * 6}"]
    lines += [f"{r['verdict']:7}  {s:{width}}  {r['reason']}" for r, s in zip(rows, shown)]
    n_err = sum(r["verdict"] == "error" for r in rows)
    lines.append(f"{len(rows)} checked, {n_err} error(s) (paths relative to {base})")
    return "\n".join(lines)
