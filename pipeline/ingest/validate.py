"""``thermoscope check``: a verdict for every candidate file, without computing anything.

Runs every validation of discovery (headers, steps, shard indexes, cross-checkpoint tensor
consistency, logs, config) and reports all problems instead of stopping at the first.
"""

from __future__ import annotations

import os

from pipeline.ingest.discovery import Problem, scan


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
    s = scan(path)
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
    base = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    base = base if os.path.isdir(base) else os.path.dirname(base)
    shown = [os.path.relpath(p, base) if base else p for p in paths]
    width = max(len(s) for s in shown)
    lines = [f"{'verdict':7}  {'path':{width}}  reason", f"{'-' * 7}  {'-' * width}  {'-' * 6}"]
    lines += [f"{r['verdict']:7}  {s:{width}}  {r['reason']}" for r, s in zip(rows, shown)]
    n_err = sum(r["verdict"] == "error" for r in rows)
    lines.append(f"{len(rows)} checked, {n_err} error(s) (paths relative to {base})")
    return "\n".join(lines)
