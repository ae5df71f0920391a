"""The sections of the report page, in page order (``build_sections``).

Each ``*_section`` function takes what it shows (root attrs, run datasets, the sweep
dataset) and returns a ``Section``; when its data is absent it returns the section with a
note saying what is missing, so the page always has the same headings.
"""

from __future__ import annotations

import os
import re

import numpy as np
import xarray as xr

from pipeline.core.reasons import TemperatureReason
from pipeline.report import figures
from pipeline.report.data import (
    equilibrium_steps,
    find_free_energy,
    layer_coord,
    layer_last,
    nonfinite_per_layer,
    run_names,
    scalar,
    skipped_files,
    sweep_points,
    values,
)
from pipeline.report.html import Section, esc, figure_html, fmt, note, table_html
from pipeline.report.metrics import run_metrics

# ---------------------------------------------------------------- summary


def _hottest(ds: xr.Dataset, n: int = 3) -> str:
    """The ``n`` layers with the highest mean temperature, 'name (T)' joined by commas."""
    t = values(ds, "temperature")
    if t is None or "layer" not in ds["temperature"].dims or not np.isfinite(t).any():
        return "–"
    temperature = ds["temperature"].astype(float)
    mean = temperature.mean([d for d in temperature.dims if d != "layer"])
    mean = mean.where(np.isfinite(mean), drop=True).sortby(mean, ascending=False)
    return ", ".join(
        f"{layer} ({fmt(float(v), 3)})"
        for layer, v in zip(mean["layer"].values[:n], mean.values[:n])
    )


def _equilibrium_text(ds: xr.Dataset) -> str:
    """How many layers reached equilibrium, and when (first, median, last onset step)."""
    eq = equilibrium_steps(ds)
    if eq is None:
        return "not computed"
    done = eq[np.isfinite(eq)]
    if not len(done):
        return f"none of {len(eq)} layers"
    return (
        f"{len(done)}/{len(eq)} layers, first at step {fmt(done.min())}, "
        f"median {fmt(float(np.median(done)))}, last {fmt(done.max())}"
    )


def _phases_text(ds: xr.Dataset) -> str:
    """The learning-rate schedule's phases as 'phase first–last step'."""
    if "learning_rate" not in ds.variables:
        return "no LR log"
    seg = figures.lr_phases(ds["step"].values, ds["learning_rate"].values)
    return ", ".join(f"{p} {fmt(a)}–{fmt(b)}" for a, b, p in seg) or "no LR log"


def _log_text(ds: xr.Dataset) -> str:
    """The run's training log: file (relative to the run folder) and the loss / LR keys used."""
    src = ds.attrs.get("log_source", "none")
    if src == "none":
        return "no log"
    run_dir = ds.attrs.get("path", "")
    if run_dir and src.startswith(run_dir.rstrip(os.sep) + os.sep):
        src = os.path.relpath(src, run_dir)
    keys = (ds.attrs.get("log_loss_key", "none"), ds.attrs.get("log_lr_key", "none"))
    return f"{src} (loss: {keys[0]}, LR: {keys[1]})"


def _value_at(m: dict[str, float], key: str) -> str:
    """'value @ step' for a metric with a ``<key>_step`` companion."""
    return f"{fmt(m.get(key, np.nan))} @ {fmt(m.get(f'{key}_step', np.nan))}"


SUMMARY_COLUMNS = [
    "run",
    "steps",
    "layers",
    "global T now [loss] @ step",
    "global T peak [loss] @ step",
    "final loss",
    "hottest layers (mean T)",
    "equilibrated",
    "LR phases",
    "training log (keys)",
    "temperature from (optimizer → estimator)",
]


def _estimator_text(ds: xr.Dataset) -> str:
    """Which optimizer and relation made the run's temperature, or why there is none."""
    if "temperature_estimator" not in ds:
        return "—"
    opt = ds.attrs.get("optimizer", "unknown")
    source = ds.attrs.get("optimizer_source", "")
    refusal = str(ds["temperature_refusal"].values)
    if refusal:
        return f"no temperature ({opt}): {refusal[:240]} (D and D/lr² are reported)"
    text = f"{opt} ({source}) → {ds['temperature_estimator'].values}"
    clipped = float(ds["clip_fraction"].values) if "clip_fraction" in ds else np.nan
    if np.isfinite(clipped) and clipped > 0:
        text += f"; gradient clipped at {clipped:.0%} of logged steps"
    return text


def reason_texts(codes: xr.DataArray) -> dict[str, str]:
    """{code: sentence} of a reason-code variable, from its ``reasons`` attr
    ("0: text; 1: text"; a sentence may itself hold "; ", so split only before a code)."""
    items = re.split(r"; (?=\d+: )", codes.attrs.get("reasons", ""))
    return dict(item.split(": ", 1) for item in items if ": " in item)


def _refusal_text(sweep: xr.Dataset) -> str:
    """The sweep fits the gates refused, each with its reason (nothing refused: empty)."""
    out = []
    for var, label in (
        ("fit_k_reason", "power-law fit"),
        ("free_energy_temperature_reason", "free-energy temperature"),
        ("heat_capacity_reason", "heat capacity"),
    ):
        if var not in sweep:
            continue
        texts = reason_texts(sweep[var])
        codes = np.atleast_1d(sweep[var].values)
        refused = sorted({int(c) for c in codes if c != 0})
        if refused:
            why = "; ".join(texts.get(str(c), f"code {c}") for c in refused)
            n = int(sum(c != 0 for c in codes))
            out.append(f"{label} refused for {n} of {codes.size}: {why}")
    return (
        (" Refused (never shown as a number): " + " · ".join(esc(t) for t in out) + ".")
        if out
        else ""
    )


def _group_fit(sweep: xr.Dataset, i: int) -> str:
    """One optimizer group's power law, or 'no fit' with the stored reason (never dashes
    standing in for numbers)."""
    b, k = float(sweep["group_fit_b"].values[i]), float(sweep["group_fit_k"].values[i])
    if np.isfinite(b) and np.isfinite(k):
        return f"T = {fmt(b)} · lr^{fmt(k)}"
    if "group_fit_k_reason" not in sweep:
        return "no fit"
    code = str(int(sweep["group_fit_k_reason"].values[i]))
    return f"no fit ({esc(reason_texts(sweep['group_fit_k_reason']).get(code, 'code ' + code))})"


def _sweep_fit_text(sweep: xr.Dataset) -> str:
    """The power law per optimizer group (never one across optimizers)."""
    if "group_fit_k" not in sweep:
        return (
            f" Sweep fit: T = {fmt(float(sweep['fit_b'].values))} · lr^"
            f"{fmt(float(sweep['fit_k'].values))}."
        )
    fits = [
        f"{esc(str(g))}: {_group_fit(sweep, i)}"
        for i, g in enumerate(sweep["optimizer_group"].values)
    ]
    return (
        " Sweep fits, within each optimizer group (runs with different optimizers are never "
        f"fitted together): {'; '.join(fits)}. Free-energy temperature and heat capacity: the "
        f"{esc(str(sweep['fit_group'].values))} group."
    )


def summary_section(attrs: dict, runs: dict[str, xr.Dataset], sweep: xr.Dataset | None) -> Section:
    """Source, version, sweep fit and one row per run of headline numbers."""
    rows = []
    for run, ds in runs.items():
        m = run_metrics(ds)
        steps = ds["step"].values
        span = f"{len(steps)} ({fmt(steps.min())}–{fmt(steps.max())})" if len(steps) else "0"
        rows.append(
            [
                run,
                span,
                int(m["n_layers"]),
                _value_at(m, "global_temperature_last"),
                _value_at(m, "global_temperature_peak"),
                m.get("final_loss", np.nan),
                _hottest(ds),
                _equilibrium_text(ds),
                _phases_text(ds),
                _log_text(ds),
                _estimator_text(ds),
            ]
        )
    intro = (
        f"<p>{len(runs)} run(s) from <code>{esc(attrs.get('source', '?'))}</code>, "
        f"thermoscope {esc(attrs.get('thermoscope_version', '?'))}."
    )
    if sweep is not None and "fit_k" in sweep and "fit_b" in sweep:
        intro += _sweep_fit_text(sweep)
    if sweep is not None:
        intro += _refusal_text(sweep)
    for run, ds in runs.items():
        if "lora_base" in ds.attrs:  # a LoRA adapter series: say what its adapted layers are
            intro += f" {esc(run)}: LoRA adapters, base model {esc(ds.attrs['lora_base'])}."
    table = table_html(SUMMARY_COLUMNS, rows, "summary") if rows else note("The store has no runs.")
    return Section("summary", "Summary", intro + "</p>" + table)


# ---------------------------------------------------------------- figures

MAP_CAPTIONS = {
    "temperature": (
        "Rows are layers from input (top) to output, columns checkpoints; colour is the "
        "layer's temperature on a log scale (grey: masked in the store, reason in the table "
        "below). Dashed lines: "
        "learning-rate phase changes; diamonds: equilibrium onset. Equal colours across "
        "rows mean equipartition."
    ),
    "diffusivity": (
        "Colour is the noise diffusivity D per parameter per step on a log scale, rows layers "
        "from input (top) to output, columns checkpoints (grey: masked in the store)."
    ),
    "weight_entropy": (
        "Rows are layers in depth order, columns checkpoints; colour is the differential "
        "entropy of the layer's weight values per parameter (higher = wider spread). "
        "Grey: NaN."
    ),
}


def _map_variable(ds: xr.Dataset, var: str) -> str:
    """The temperature map falls back to the diffusivity when the run has no learning-rate log."""
    no_temperature = var == "temperature" and (
        var not in ds or not np.isfinite(ds[var].values).any()
    )
    has_diffusivity = "diffusivity" in ds and np.isfinite(ds["diffusivity"].values).any()
    return "diffusivity" if no_temperature and has_diffusivity else var


def map_section(runs: dict[str, xr.Dataset], var: str, title: str, log: bool) -> Section:
    """One layer x step heatmap of ``var`` per run."""
    parts = []
    for run, ds in runs.items():
        shown = _map_variable(ds, var)
        if shown not in ds:
            parts.append(note(f"{run}: '{var}' not in the store; map skipped."))
            continue
        units = ds[shown].attrs.get("units", "")
        long = ds[shown].attrs.get("long_name", shown)
        fig = figures.layer_step_map(ds, shown, log, f"{long} [{units}] per layer — {run}")
        parts.append(
            figure_html(
                fig,
                _no_temperature_text(ds) + MAP_CAPTIONS[shown]
                if shown != var
                else MAP_CAPTIONS[shown],
                f"{run}: '{shown}' has no finite{' positive' if log else ''} value; map skipped.",
            )
        )
        if var == "temperature":
            parts.append(reason_table(run, ds))
    return Section(f"{var}-map", title, "".join(parts) or note("No runs."))


def _no_temperature_text(ds: xr.Dataset) -> str:
    """Why a run's temperature map shows D instead: the run's own refusal, else no LR log."""
    refusal = str(ds["temperature_refusal"].values) if "temperature_refusal" in ds else ""
    if refusal:
        return f"No temperature for this run ({refusal}). "
    return "No temperature for this run (T = D / (2 lr) needs a learning-rate log). "


def reason_table(run: str, ds: xr.Dataset) -> str:
    """Why every grey cell of the temperature map is grey: per layer, each reason code of
    ``temperature_reason`` with its steps (the store's mask, decoded from the variable's attrs).
    """
    if "temperature_reason" not in ds:
        return note(f"{run}: the store has no temperature_reason; grey cells unexplained.")
    reason = ds["temperature_reason"].values
    texts = reason_texts(ds["temperature_reason"])
    refusal = str(ds["temperature_refusal"].values) if "temperature_refusal" in ds else ""
    if refusal:  # the code-4 cells: say the run's own refusal, not the generic sentence
        texts[str(int(TemperatureReason.OPTIMIZER_STATE_MISSING))] = (
            f"optimizer relation refused: {refusal}"
        )
    steps = ds["step"].values
    rows = []
    for j, layer in enumerate(ds["layer"].values):
        masked = reason[:, j] != 0
        if not masked.any():
            continue
        why = []
        for code in np.unique(reason[masked, j]):
            at = np.flatnonzero(reason[:, j] == code)
            label = texts.get(str(int(code)), f"code {int(code)}")
            why.append(f"{label} ({len(at)} steps: {_step_ranges_idx(steps, at)})")
        rows.append([str(layer), int((~masked).sum()), "; ".join(why)])
    total = reason.size
    have = int((reason == 0).sum())
    head = (
        f"<p>{esc(run)}: {have} of {total} (layer, step) cells have a temperature "
        f"({100 * have / max(total, 1):.0f}%). Every grey cell of the map is masked in the store "
        "(NaN) for the reason below; nothing masked enters the global T, spread, sweep fits, "
        "Carnot bounds or equilibrium.</p>"
    )
    if not rows:
        return head
    return head + table_html(
        ["layer", "cells with T", "grey cells: reason (steps)"], rows, "reasons"
    )


def _step_ranges_idx(steps: np.ndarray, idx: np.ndarray) -> str:
    """Checkpoint indices as ranges of consecutive checkpoints, shown as steps."""
    parts, start = [], idx[0]
    for a, b in zip(idx, list(idx[1:]) + [None]):
        if b is None or b != a + 1:
            parts.append(
                fmt(steps[start]) if start == a else f"{fmt(steps[start])}–{fmt(steps[a])}"
            )
            start = b
    return ", ".join(parts)


def curves_section(runs: dict[str, xr.Dataset]) -> Section:
    """Global temperature, loss and learning rate against step, all runs in one figure."""
    fig = figures.global_curves(runs)
    caption = (
        "One line per run. Top: n-weighted mean layer temperature; middle: logged training loss; "
        "bottom: learning rate (log scales where all values are positive)."
    )
    return Section(
        "global-curves",
        "Global temperature, loss and learning rate",
        figure_html(fig, caption, "No global temperature, loss or learning-rate data."),
    )


def per_run_figures(runs, make, caption: str, needed: str) -> str:
    """``make(ds, run)`` for every run, each with ``caption`` (a note when it returns None)."""
    parts = [
        figure_html(make(ds, run), caption, f"{run}: '{needed}' {_missing_why(ds)}; skipped.")
        for run, ds in runs.items()
    ]
    return "".join(parts)


def _missing_why(ds: xr.Dataset) -> str:
    """Why a run's figure has nothing to draw: its temperature refusal when it has one."""
    refusal = str(ds["temperature_refusal"].values) if "temperature_refusal" in ds else ""
    return f"all NaN (no temperature: {refusal})" if refusal else "missing or all NaN"


def efficiency_section(runs: dict[str, xr.Dataset]) -> Section:
    """Per-layer work efficiency, Carnot bound and realized efficiency, one figure per run."""
    title = "Heat-engine efficiency"
    caption = (
        "Bars: activation work efficiency 1 - E[phi(z)^2]/E[z^2] per layer, coloured by engine "
        "type (scale-free vs scale-dependent); dashes: Carnot bound with the neighbour layer; "
        "diamonds: realized efficiency work/(work+heat)."
    )
    if not any("work_efficiency" in ds for ds in runs.values()):
        return Section("efficiency", title, note("No efficiency variables in the store."))
    return Section(
        "efficiency",
        title,
        per_run_figures(runs, figures.efficiency_bars, caption, "work_efficiency"),
    )


def work_heat_section(runs: dict[str, xr.Dataset]) -> Section:
    """Per-layer total work and heat of each run (first law), one figure per run."""
    title = "Work and heat per layer"
    caption = (
        "Per layer, the run's total work (systematic descent, drift part) and heat (fluctuation "
        "part) in loss units: positive work is loss removed by the drift, heat is the net loss "
        "gained by the fluctuating (valley) directions (first law: dL = heat - work)."
    )
    if not any(v in ds for ds in runs.values() for v in ("work", "heat")):
        return Section("work-heat", title, note("No work/heat variables in the store."))
    return Section(
        "work-heat",
        title,
        per_run_figures(runs, figures.work_heat_bars, caption, "work/heat"),
    )


def sweep_table(sweep: xr.Dataset) -> str:
    """Every numeric 1-D sweep variable over the run dimension, one row per run."""
    points = sweep_points(sweep)
    dim = points[0].dims[0] if points else next(iter(sweep.dims), None)
    cols = [v for v in sweep.data_vars if sweep[v].dims == (dim,) and sweep[v].dtype.kind in "biuf"]
    if dim is None or not cols:
        return ""
    header = ["run"] + [f"{v} [{sweep[v].attrs.get('units', '')}]" for v in cols]
    rows = [
        [str(n)] + [float(sweep[v].values[i]) for v in cols]
        for i, n in enumerate(run_names(sweep, dim))
    ]
    return table_html(header, rows, "sortable")


def sweep_section(sweep: xr.Dataset | None) -> Section:
    """Temperature against learning rate across runs, the power-law fit, and the sweep table."""
    caption = (
        "Each point is one run's temperature against its learning rate on log-log axes; the line "
        "is the power-law fit T = b lr^k (k = 1 means T proportional to LR)."
    )
    title = "Temperature vs learning rate"
    if sweep is None:
        return Section("sweep", title, note("Single run: no sweep node."))
    points = sweep_points(sweep)
    if points is not None and "run_optimizer" in sweep.coords and "fit_group" in sweep:
        group = str(sweep["fit_group"].values)
        same = sweep["run_optimizer"] == group  # never one line across optimizers
        points = tuple(p.where(same) if "run" in p.dims else p for p in points)
        caption += (
            f" Only the {esc(group)} runs (the fit group) are drawn; runs of other optimizers "
            "are in the table and fitted within their own group (summary)."
        )
    fig = (
        None
        if points is None
        else figures.sweep_power_law(*points, scalar(sweep, "fit_b"), scalar(sweep, "fit_k"))
    )
    body = figure_html(
        fig, caption, "Sweep node lacks finite positive learning rates/temperatures; skipped."
    )
    return Section("sweep", title, body + sweep_table(sweep))


def _grouped_sweep(sweep: xr.Dataset | None) -> bool:
    """The sweep node says each run's optimizer and which group its fits use."""
    return sweep is not None and "run_optimizer" in sweep.coords and "fit_group" in sweep


def free_energy_section(runs, sweep) -> Section:
    """Stationary states in the (S, U) plane: slopes between them are temperatures."""
    found = find_free_energy(runs, sweep)
    if found is None:
        return Section("free-energy", "Free energy", note("No (U, S) points in the store."))
    caption = (
        "Each point is a stationary state (energy U = loss, entropy S); the slope dU/dS between "
        "two points is the temperature at which both minimise F = U - T S."
    )
    u, s, labels = found
    if _grouped_sweep(sweep) and u.dims == sweep["run_optimizer"].dims:  # the sweep's points
        group = str(sweep["fit_group"].values)
        same = sweep["run_optimizer"] == group  # never compared across optimizers
        found = (u.where(same), s.where(same), labels)
        caption += (
            f" Only the {esc(group)} runs (the fit group) are drawn: states of different "
            "optimizers are not points of one F = U - T S."
        )
    return Section(
        "free-energy",
        "Free energy",
        figure_html(figures.free_energy_points(*found), caption, "U/S all NaN; skipped."),
    )


# ---------------------------------------------------------------- tables

LAYER_COLUMNS = [
    "run",
    "layer",
    "depth",
    "n_params",
    "activation",
    "engine type",
    "mean T [loss]",
    "final T [loss]",
    "final entropy [nats/param]",
    "work eff.",
    "realized eff.",
    "equilibrium step",
    "non-finite",
]


def layer_rows(run: str, ds: xr.Dataset) -> tuple[list[list], list[str]]:
    """Per-layer rows of one run (depth order) and row classes ('bad' when non-finite > 0)."""
    order = figures.depth_order(ds)
    nan = np.full(len(order), np.nan)

    def mean(var):
        v = figures.layer_mean(ds, var, order)
        return nan if v is None else v

    per_layer = nonfinite_per_layer(ds)
    nf = nan if per_layer is None else np.asarray(per_layer.values, float)[order]
    eq = equilibrium_steps(ds)
    cols = [
        [run] * len(order),
        [str(x) for x in ds["layer"].values[order]],
        layer_coord(ds, "depth", order, np.nan),
        layer_coord(ds, "n_params", order, np.nan),
        [str(x) for x in layer_coord(ds, "activation", order, "–")],
        [str(x) for x in layer_coord(ds, "engine_type", order, "–")],
        mean("temperature"),
        layer_last(ds, "temperature", order),
        layer_last(ds, "weight_entropy", order),
        mean("work_efficiency"),
        mean("realized_efficiency"),
        nan if eq is None else eq[order],
        nf,
    ]
    rows = [
        [
            float(v) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else v
            for v in row
        ]
        for row in zip(*cols)
    ]
    return rows, ["bad" if n > 0 else "" for n in nf]


def layer_table_section(runs: dict[str, xr.Dataset]) -> Section:
    """One sortable table of every layer of every run."""
    rows, classes = [], []
    for run, ds in runs.items():
        if "layer" in ds.dims:
            r, c = layer_rows(run, ds)
            rows += r
            classes += c
    if not rows:
        return Section("layers", "Per-layer table", note("No layers."))
    body = (
        "<p>Click a column header to sort (click again to reverse). Rows with non-finite values "
        "are highlighted.</p>" + table_html(LAYER_COLUMNS, rows, "sortable", classes)
    )
    return Section("layers", "Per-layer table", body)


def nonfinite_section(runs: dict[str, xr.Dataset]) -> Section:
    """Layers with NaN/Inf values: how many and the first step they appeared."""
    rows = []
    for run, ds in runs.items():
        total = nonfinite_per_layer(ds)
        if total is None:
            continue
        nf = ds["nonfinite_count"].fillna(0)
        for layer, count in zip(total["layer"].values, total.values):
            if count > 0:
                at = nf.sel(layer=layer)
                first = (
                    ds["step"].values[int(np.argmax(at.values > 0))]
                    if "step" in at.dims
                    else np.nan
                )
                rows.append([run, str(layer), float(count), float(first)])
    if not any("nonfinite_count" in ds for ds in runs.values()):
        body = note("'nonfinite_count' not in the store.")
    elif not rows:
        body = '<p class="ok">No NaN/Inf values in any checkpoint.</p>'
    else:
        body = (
            '<p class="bad">NaN/Inf values found: estimates for these layers exclude them.</p>'
            + table_html(
                ["run", "layer", "non-finite values", "first step"], rows, "", ["bad"] * len(rows)
            )
        )
    return Section("nonfinite", "Non-finite values", body)


def skipped_section(attrs: dict) -> Section:
    """Files discovery left out (unreadable under ``checkpoints.skip_bad``, or ignored)."""
    items = skipped_files(attrs)
    if not items:
        return Section("skipped", "Skipped files", '<p class="ok">No files were skipped.</p>')
    lis = "".join(f"<li><code>{esc(p)}</code>: {esc(r)}</li>" for p, r in items)
    return Section(
        "skipped", "Skipped files", f"<p>{len(items)} file(s) were skipped:</p><ul>{lis}</ul>"
    )


def build_sections(
    attrs: dict, runs: dict[str, xr.Dataset], sweep: xr.Dataset | None
) -> list[Section]:
    """All page sections in page order (summary, temperature map first among figures)."""
    return [
        summary_section(attrs, runs, sweep),
        map_section(runs, "temperature", "Per-layer temperature map", log=True),
        map_section(runs, "weight_entropy", "Per-layer weight-entropy map", log=False),
        curves_section(runs),
        efficiency_section(runs),
        work_heat_section(runs),
        sweep_section(sweep),
        free_energy_section(runs, sweep),
        layer_table_section(runs),
        nonfinite_section(runs),
        skipped_section(attrs),
    ]
