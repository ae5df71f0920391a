"""The report: one self-contained HTML page, DVC metrics (JSON) and DVC plot tables (CSV).

``render_report(store_path, out_dir)`` reads the store written by the analysis
(``xarray.open_datatree(store_path, engine="zarr")``, schema in ``docs/INTERNALS.md``) and
writes, atomically (everything goes to a temporary folder first, then ``os.replace``):

- ``index.html``: summary, temperature maps, entropy maps, global curves, efficiencies,
  work/heat, sweep power law, free energy, a sortable per-layer table, non-finite counts and
  skipped files. Figures are base64 PNGs; CSS and JS are inline; no external resource.
- ``metrics.json``: flat ``{"<run>.<metric>": number}`` (non-finite values are left out).
- ``plots/<run>.global.csv`` (step, global_temperature, loss, learning_rate),
  ``plots/<run>.layer_temperature.csv`` (step, layer, temperature) and, with a sweep,
  ``plots/sweep.temperature_vs_lr.csv`` (run, lr, temperature); ``plots/global.csv`` and
  ``plots/layer_temperature.csv`` hold all runs together, with a ``run`` column.

Sweep-node variables read when present: the LR and temperature per run (``run_learning_rate``
or ``lr``; ``run_temperature`` or ``temperature``), ``fit_b``, ``fit_k`` (T = b lr^k), the
free-energy points U, S (``internal_energy`` and ``run_ensemble_entropy``, or ``U`` and ``S``;
also searched in run nodes) and every other per-run sweep variable (shown as a table).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from pipeline.core.errors import InputError
from pipeline.report import figures

SWEEP = "sweep"
SWEEP_LR = ("run_learning_rate", "lr")
SWEEP_TEMPERATURE = ("run_temperature", "temperature")
FREE_ENERGY_NAMES = (
    ("internal_energy", "run_ensemble_entropy"),
    ("U", "S"),
    ("internal_energy", "ensemble_entropy"),
)


@dataclass
class Section:
    """One ``<section>`` of the page."""

    id: str
    title: str
    body: str


# ---------------------------------------------------------------- reading the store


def open_store(store_path: Path) -> xr.DataTree:
    """Open the store lazily; a missing or unreadable store is an ``InputError``."""
    if not Path(store_path).exists():
        raise InputError(store_path, "store not found (run `thermoscope analyze` first)")
    try:
        return xr.open_datatree(store_path, engine="zarr")
    except Exception as exc:  # zarr raises several unrelated types for a broken store
        raise InputError(store_path, f"cannot open as a Zarr DataTree: {exc}") from exc


def split_tree(tree: xr.DataTree) -> tuple[dict, dict[str, xr.Dataset], xr.Dataset | None]:
    """Root attrs, run datasets (nodes with a ``step`` dim, loaded) and the sweep dataset."""
    runs, sweep = {}, None
    for name, child in tree.children.items():
        ds = child.to_dataset()
        if name == SWEEP:
            sweep = ds.load()
        elif "step" in ds.dims:
            runs[name] = ds.load()
    return dict(tree.attrs), runs, sweep


def skipped_files(attrs: dict) -> list[tuple[str, str]]:
    """The root ``skipped`` attr (JSON list of [path, reason], or already a list)."""
    raw = attrs.get("skipped", [])
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else []
        except json.JSONDecodeError:
            return [(raw, "unparsed 'skipped' attribute")]
    return [(str(item[0]), str(item[1]) if len(item) > 1 else "") for item in raw]


# ---------------------------------------------------------------- numbers


def _values(ds: xr.Dataset, var: str) -> np.ndarray | None:
    return np.asarray(ds[var].values, float) if var in ds.variables else None


def last_finite(steps: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(step, value) of the last finite value; NaNs when there is none."""
    ok = np.flatnonzero(np.isfinite(values))
    return (float(steps[ok[-1]]), float(values[ok[-1]])) if len(ok) else (np.nan, np.nan)


def peak(steps: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(step, value) of the largest finite value (first if tied); NaNs when there is none."""
    if not np.isfinite(values).any():
        return np.nan, np.nan
    i = int(np.nanargmax(values))
    return float(steps[i]), float(values[i])


def _nanmean(values: np.ndarray | None) -> float:
    if values is None or not np.isfinite(values).any():
        return np.nan
    return float(np.nanmean(values))


def equilibrium_steps(ds: xr.Dataset) -> np.ndarray | None:
    """Equilibrium onset step per layer (NaN = never), from ``equilibrium_step`` or ``equilibrated``."""
    onset = figures._eq_onset(ds)
    if onset is None:
        return None
    v = np.asarray(onset.values, float)
    return np.where(v >= 0, v, np.nan)


def run_metrics(ds: xr.Dataset) -> dict[str, float]:
    """Scalar metrics of one run (NaN where the input is missing)."""
    steps = ds["step"].values
    m = {"n_steps": float(ds.sizes["step"]), "n_layers": float(ds.sizes.get("layer", 0))}
    gt = _values(ds, "global_temperature")
    if gt is not None:
        m["global_temperature_last_step"], m["global_temperature_last"] = last_finite(steps, gt)
        m["global_temperature_peak_step"], m["global_temperature_peak"] = peak(steps, gt)
    spread = _values(ds, "temperature_spread")
    if spread is not None:
        m["temperature_spread_last"] = last_finite(steps, spread)[1]
    loss = _values(ds, "loss")
    if loss is not None:
        m["final_loss"] = last_finite(steps, loss)[1]
        m["min_loss"] = float(np.nanmin(loss)) if np.isfinite(loss).any() else np.nan
    m["mean_temperature"] = _nanmean(_values(ds, "temperature"))
    m["mean_weight_entropy"] = _nanmean(_values(ds, "weight_entropy"))
    nf = _values(ds, "nonfinite_count")
    if nf is not None:
        m["nonfinite_total"] = float(np.nansum(nf))
    eq = equilibrium_steps(ds)
    if eq is not None:
        m["equilibrated_layers"] = float(np.isfinite(eq).sum())
    for key in ("global_temperature_last", "global_temperature_peak", "mean_temperature"):
        if m.get(key, 0.0) > 0:  # temperatures are often ~1e-6 loss units: DVC shows 5 decimals
            m[f"log10_{key}"] = float(np.log10(m[key]))
    return m


def compute_metrics(runs: dict[str, xr.Dataset], sweep: xr.Dataset | None) -> dict[str, float]:
    """Flat ``{"<run>.<metric>": value}``; finite values only (JSON has no NaN)."""
    flat = {f"{run}.{k}": v for run, ds in runs.items() for k, v in run_metrics(ds).items()}
    if sweep is not None:
        for var in ("fit_b", "fit_k"):
            if var in sweep and sweep[var].size == 1:
                flat[f"{SWEEP}.{var}"] = float(sweep[var].values)
    return {k: float(v) for k, v in flat.items() if np.isfinite(v)}


def safe_name(name: str) -> str:
    """A run name usable as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "run"


def first_present(ds: xr.Dataset | None, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that is a variable of ``ds``."""
    return next((n for n in names if ds is not None and n in ds.variables), None)


def sweep_points(sweep: xr.Dataset | None) -> tuple[xr.DataArray, xr.DataArray] | None:
    """(learning rate, temperature) per run from the sweep node, when both are there and 1-D."""
    lr, temp = first_present(sweep, SWEEP_LR), first_present(sweep, SWEEP_TEMPERATURE)
    if lr is None or temp is None or sweep[lr].ndim != 1 or sweep[lr].dims != sweep[temp].dims:
        return None
    return sweep[lr], sweep[temp]


def _run_tables(ds: xr.Dataset) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    cols = {"step": ds["step"].values}
    for var in ("global_temperature", "loss", "learning_rate"):
        if var in ds.variables and ds[var].dims == ("step",):
            cols[var] = ds[var].values.astype(float)
    layer = None
    if "temperature" in ds and set(ds["temperature"].dims) == {"step", "layer"}:
        layer = (
            ds["temperature"]
            .transpose("step", "layer")
            .to_series()
            .rename("temperature")
            .reset_index()[["step", "layer", "temperature"]]
        )
    return pd.DataFrame(cols), layer


def plot_tables(runs: dict[str, xr.Dataset], sweep: xr.Dataset | None) -> dict[str, pd.DataFrame]:
    """DVC plot tables keyed by file name under ``plots/``: per run, all runs, and the sweep."""
    tables, combined = {}, {"global.csv": [], "layer_temperature.csv": []}
    for run, ds in runs.items():
        glob, layer = _run_tables(ds)
        tables[f"{safe_name(run)}.global.csv"] = glob
        combined["global.csv"].append(glob.assign(run=run))
        if layer is not None:
            tables[f"{safe_name(run)}.layer_temperature.csv"] = layer
            combined["layer_temperature.csv"].append(layer.assign(run=run))
    tables.update(
        {name: pd.concat(parts, ignore_index=True) for name, parts in combined.items() if parts}
    )
    points = sweep_points(sweep)
    if points is not None:
        lr, temp = points
        dim = lr.dims[0]
        names = sweep[dim].values if dim in sweep.coords else np.arange(sweep.sizes[dim])
        tables[f"{SWEEP}.temperature_vs_lr.csv"] = pd.DataFrame(
            {"run": names, "lr": lr.values, "temperature": temp.values}
        )
    return tables


# ---------------------------------------------------------------- HTML pieces


def esc(x) -> str:
    return html.escape(str(x))


def fmt(x, digits: int = 4) -> str:
    """Compact number formatting; '–' for NaN/None."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)) or (
        isinstance(x, float) and x.is_integer() and abs(x) < 1e12
    ):
        return f"{int(x):d}"
    return f"{float(x):.{digits}g}"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def figure_html(fig, caption: str, missing: str) -> str:
    """``<figure>`` with the PNG and its one-line 'how to read' caption, or a note when ``fig`` is None."""
    if fig is None:
        return note(missing)
    uri = figures.figure_to_data_uri(fig)
    return (
        f'<figure><img alt="{esc(caption)}" src="{uri}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def table_html(
    header: list[str], rows: list[list], cls: str = "", row_cls: list[str] | None = None
) -> str:
    """A table; numeric cells carry ``data-v`` so the inline JS sorts them numerically."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for v in row:
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                num = float(v)
                cells.append(
                    f'<td class="num" data-v="{num if np.isfinite(num) else ""}">{fmt(num)}</td>'
                )
            else:
                cells.append(f"<td>{esc(v)}</td>")
        rc = f' class="{row_cls[i]}"' if row_cls and row_cls[i] else ""
        body.append(f"<tr{rc}>{''.join(cells)}</tr>")
    table = (
        f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )
    return f'<div class="tablewrap">{table}</div>' if "sortable" in cls else table


# ---------------------------------------------------------------- sections


def _hottest(ds: xr.Dataset, n: int = 3) -> str:
    t = _values(ds, "temperature")
    if t is None or "layer" not in ds["temperature"].dims or not np.isfinite(t).any():
        return "–"
    mean = ds["temperature"].astype(float).mean([d for d in ds["temperature"].dims if d != "layer"])
    mean = mean.where(np.isfinite(mean), drop=True).sortby(mean, ascending=False)
    return ", ".join(
        f"{layer} ({fmt(float(v), 3)})"
        for layer, v in zip(mean["layer"].values[:n], mean.values[:n])
    )


def _equilibrium_text(ds: xr.Dataset) -> str:
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
    if "learning_rate" not in ds.variables:
        return "no LR log"
    seg = figures.lr_phases(ds["step"].values, ds["learning_rate"].values)
    return ", ".join(f"{p} {fmt(a)}–{fmt(b)}" for a, b, p in seg) or "no LR log"


def summary_section(attrs: dict, runs: dict[str, xr.Dataset], sweep: xr.Dataset | None) -> Section:
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
                f"{fmt(m.get('global_temperature_last', np.nan))} @ {fmt(m.get('global_temperature_last_step', np.nan))}",
                f"{fmt(m.get('global_temperature_peak', np.nan))} @ {fmt(m.get('global_temperature_peak_step', np.nan))}",
                m.get("final_loss", np.nan),
                _hottest(ds),
                _equilibrium_text(ds),
                _phases_text(ds),
            ]
        )
    header = [
        "run",
        "steps",
        "layers",
        "global T now [loss] @ step",
        "global T peak [loss] @ step",
        "final loss",
        "hottest layers (mean T)",
        "equilibrated",
        "LR phases",
    ]
    intro = (
        f"<p>{len(runs)} run(s) from <code>{esc(attrs.get('source', '?'))}</code>, "
        f"thermoscope {esc(attrs.get('thermoscope_version', '?'))}."
    )
    if sweep is not None and "fit_k" in sweep and "fit_b" in sweep:
        intro += (
            f" Sweep fit: T = {fmt(float(sweep['fit_b'].values))} · lr^"
            f"{fmt(float(sweep['fit_k'].values))}."
        )
    body = (
        intro
        + "</p>"
        + (table_html(header, rows, "summary") if rows else note("The store has no runs."))
    )
    return Section("summary", "Summary", body)


MAP_CAPTIONS = {
    "temperature": (
        "Rows are layers from input (top) to output, columns checkpoints; colour is the "
        "layer's temperature on a log scale (grey: not identifiable / NaN). Dashed lines: "
        "learning-rate phase changes; diamonds: equilibrium onset. Equal colours across "
        "rows mean equipartition."
    ),
    "diffusivity": (
        "No learning-rate log for this run, so no temperature (T = D / (2 lr) needs the LR): "
        "colour is the noise diffusivity D per parameter per step on a log scale, rows layers "
        "from input (top) to output, columns checkpoints (grey: not identifiable / NaN)."
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
                MAP_CAPTIONS[shown],
                f"{run}: '{shown}' has no finite{' positive' if log else ''} value; map skipped.",
            )
        )
    return Section(f"{var}-map", title, "".join(parts) or note("No runs."))


def curves_section(runs: dict[str, xr.Dataset]) -> Section:
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
    parts = [
        figure_html(make(ds, run), caption, f"{run}: '{needed}' missing or all NaN; skipped.")
        for run, ds in runs.items()
    ]
    return "".join(parts)


def efficiency_section(runs: dict[str, xr.Dataset]) -> Section:
    caption = (
        "Bars: activation work efficiency 1 - E[phi(z)^2]/E[z^2] per layer, coloured by engine type "
        "(scale-free vs scale-dependent); dashes: Carnot bound with the neighbour layer; diamonds: "
        "realized efficiency work/(work+heat)."
    )
    if not any("work_efficiency" in ds for ds in runs.values()):
        return Section(
            "efficiency", "Heat-engine efficiency", note("No efficiency variables in the store.")
        )
    return Section(
        "efficiency",
        "Heat-engine efficiency",
        per_run_figures(runs, figures.efficiency_bars, caption, "work_efficiency"),
    )


def work_heat_section(runs: dict[str, xr.Dataset]) -> Section:
    caption = (
        "Per layer, the run's total work (systematic descent, drift part) and heat (fluctuation part) "
        "in loss units: positive work is loss removed by the drift, heat is the net loss gained by the "
        "fluctuating (valley) directions (first law: dL = heat - work)."
    )
    if not any(v in ds for ds in runs.values() for v in ("work", "heat")):
        return Section(
            "work-heat", "Work and heat per layer", note("No work/heat variables in the store.")
        )
    return Section(
        "work-heat",
        "Work and heat per layer",
        per_run_figures(runs, figures.work_heat_bars, caption, "work/heat"),
    )


def _scalar(ds: xr.Dataset, var: str) -> float:
    return float(ds[var].values) if var in ds and ds[var].size == 1 else np.nan


def sweep_table(sweep: xr.Dataset) -> str:
    """Every numeric 1-D sweep variable over the run dimension, one row per run."""
    points = sweep_points(sweep)
    dim = points[0].dims[0] if points else next(iter(sweep.dims), None)
    cols = [v for v in sweep.data_vars if sweep[v].dims == (dim,) and sweep[v].dtype.kind in "biuf"]
    if dim is None or not cols:
        return ""
    names = sweep[dim].values if dim in sweep.coords else np.arange(sweep.sizes[dim])
    header = ["run"] + [f"{v} [{sweep[v].attrs.get('units', '')}]" for v in cols]
    rows = [[str(n)] + [float(sweep[v].values[i]) for v in cols] for i, n in enumerate(names)]
    return table_html(header, rows, "sortable")


def sweep_section(sweep: xr.Dataset | None) -> Section:
    caption = (
        "Each point is one run's temperature against its learning rate on log-log axes; the line is "
        "the power-law fit T = b lr^k (k = 1 means T proportional to LR)."
    )
    title = "Temperature vs learning rate"
    if sweep is None:
        return Section("sweep", title, note("Single run: no sweep node."))
    points = sweep_points(sweep)
    fig = (
        None
        if points is None
        else figures.sweep_power_law(*points, _scalar(sweep, "fit_b"), _scalar(sweep, "fit_k"))
    )
    body = figure_html(
        fig, caption, "Sweep node lacks finite positive learning rates/temperatures; skipped."
    )
    return Section("sweep", title, body + sweep_table(sweep))


def find_free_energy(runs, sweep) -> tuple[xr.DataArray, xr.DataArray, list[str]] | None:
    """(U, S, labels) from the sweep node, else from the first run node that has them."""
    nodes = ([(SWEEP, sweep)] if sweep is not None else []) + list(runs.items())
    for _name, ds in nodes:
        for u, s in FREE_ENERGY_NAMES:
            if u in ds and s in ds and ds[u].shape == ds[s].shape:
                da = ds[u]
                labels = (
                    [str(x) for x in da[da.dims[0]].values]
                    if da.ndim == 1 and da.dims[0] in ds.coords
                    else [str(i) for i in range(da.size)]
                )
                return ds[u], ds[s], labels
    return None


def free_energy_section(runs, sweep) -> Section:
    found = find_free_energy(runs, sweep)
    if found is None:
        return Section("free-energy", "Free energy", note("No (U, S) points in the store."))
    caption = (
        "Each point is a stationary state (energy U = loss, entropy S); the slope dU/dS between two "
        "points is the temperature at which both minimise F = U - T S."
    )
    return Section(
        "free-energy",
        "Free energy",
        figure_html(figures.free_energy_points(*found), caption, "U/S all NaN; skipped."),
    )


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


def layer_last(ds: xr.Dataset, var: str, order: np.ndarray) -> np.ndarray:
    """Last finite value along ``step`` per layer, in ``order`` (NaN when none or absent)."""
    if var not in ds or set(ds[var].dims) != {"step", "layer"}:
        return np.full(len(order), np.nan)
    v = np.asarray(ds[var].transpose("step", "layer").values, float)[:, order]
    ok = np.isfinite(v)
    last = v.shape[0] - 1 - np.argmax(ok[::-1], axis=0)
    return np.where(ok.any(axis=0), v[last, np.arange(v.shape[1])], np.nan)


def layer_coord(ds: xr.Dataset, var: str, order: np.ndarray, default) -> list:
    """A per-layer coordinate/variable as plain Python values in ``order``."""
    if var not in ds.variables or ds[var].dims != ("layer",):
        return [default] * len(order)
    return [v.item() if hasattr(v, "item") else v for v in np.asarray(ds[var].values)[order]]


def layer_rows(run: str, ds: xr.Dataset) -> tuple[list[list], list[str]]:
    """Per-layer table rows for one run (depth order) and row classes ('bad' when non-finite > 0)."""
    order = figures.depth_order(ds)
    nan = np.full(len(order), np.nan)

    def mean(var):
        v = figures.layer_mean(ds, var, order)
        return nan if v is None else v

    nf = (
        np.asarray(
            ds["nonfinite_count"]
            .fillna(0)
            .sum([d for d in ds["nonfinite_count"].dims if d != "layer"])
            .values,
            float,
        )[order]
        if "nonfinite_count" in ds
        else nan
    )
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
    rows, classes = [], []
    for run, ds in runs.items():
        if "layer" in ds.dims:
            r, c = layer_rows(run, ds)
            rows += r
            classes += c
    if not rows:
        return Section("layers", "Per-layer table", note("No layers."))
    body = (
        "<p>Click a column header to sort (click again to reverse). Rows with non-finite values are "
        "highlighted.</p>" + table_html(LAYER_COLUMNS, rows, "sortable", classes)
    )
    return Section("layers", "Per-layer table", body)


def nonfinite_section(runs: dict[str, xr.Dataset]) -> Section:
    rows = []
    for run, ds in runs.items():
        if "nonfinite_count" not in ds:
            continue
        nf = ds["nonfinite_count"].fillna(0)
        other = [d for d in nf.dims if d != "layer"]
        total = nf.sum(other) if other else nf
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


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1180px;
padding:1em 1.5em;color:#222;background:#fff}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:.85em;color:#555;margin-top:.3em}
table{border-collapse:collapse;font-size:.8em;margin:.5em 0}th,td{border:1px solid #ddd;padding:2px 6px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \\2195";color:#aaa}
tr.bad td{background:#fde2e1}.bad{color:#b00020;font-weight:600}.ok{color:#1b7f3b}
.note{color:#777;font-style:italic}nav a{margin-right:.8em;font-size:.85em}
.tablewrap{max-height:600px;overflow:auto}
"""

JS = """
(function(){
  function key(td){var v=td.getAttribute('data-v');
    if(v!==null){return v===''?Infinity:parseFloat(v);} return td.textContent.toLowerCase();}
  var n=0, tables=document.querySelectorAll('table.sortable');
  tables.forEach(function(t){
    t.querySelectorAll('th').forEach(function(th,c){
      th.addEventListener('click',function(){
        var asc=th.getAttribute('data-dir')!=='asc'; th.setAttribute('data-dir',asc?'asc':'desc');
        var tb=t.tBodies[0], rows=Array.prototype.slice.call(tb.rows);
        rows.sort(function(a,b){var x=key(a.cells[c]),y=key(b.cells[c]);
          return (x<y?-1:x>y?1:0)*(asc?1:-1);});
        rows.forEach(function(r){tb.appendChild(r);});
      }); n++;
    });
  });
  document.body.setAttribute('data-sortable-tables', String(tables.length));
  document.body.setAttribute('data-sortable-headers', String(n));
})();
"""


def render_html(sections: list[Section], title: str) -> str:
    """The whole page as one string."""
    nav = "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><nav>{nav}</nav>{body}<script>{JS}</script></body></html>"
    )


# ---------------------------------------------------------------- writing


def write_outputs(tree: xr.DataTree, folder: Path) -> None:
    """Compute everything from the tree and write index.html, metrics.json and plots/ into ``folder``."""
    attrs, runs, sweep = split_tree(tree)
    plots = folder / "plots"
    plots.mkdir()
    for name, df in plot_tables(runs, sweep).items():
        df.to_csv(plots / name, index=False)
    (folder / "metrics.json").write_text(
        json.dumps(compute_metrics(runs, sweep), indent=2, sort_keys=True)
    )
    sections = build_sections(attrs, runs, sweep)
    (folder / "index.html").write_text(
        render_html(sections, "thermoscope report"), encoding="utf-8"
    )


def install(tmp: Path, out_dir: Path) -> None:
    """Move the finished files into ``out_dir`` with ``os.replace`` (index.html last); drop stale plots."""
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    new_plots = {p.name for p in (tmp / "plots").iterdir()}
    for name in sorted(new_plots):
        os.replace(tmp / "plots" / name, out_dir / "plots" / name)
    for old in (out_dir / "plots").iterdir():
        if old.is_file() and old.suffix in (".csv", ".json") and old.name not in new_plots:
            old.unlink()
    os.replace(tmp / "metrics.json", out_dir / "metrics.json")
    os.replace(tmp / "index.html", out_dir / "index.html")


def render_report(store_path, out_dir) -> Path:
    """Render the report of the store at ``store_path`` into ``out_dir``; returns ``out_dir/index.html``.

    All files are produced in a temporary folder beside ``out_dir`` and only then moved into
    place, so a failure while reading the store or drawing leaves an old report untouched.
    """
    store_path, out_dir = Path(store_path), Path(out_dir)
    tree = open_store(store_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write_outputs(tree, tmp)
        install(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        tree.close()
    return out_dir / "index.html"
