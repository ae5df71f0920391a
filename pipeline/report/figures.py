"""Report figures: one function per figure, xarray in, matplotlib ``Figure`` out (or None).

Every function returns ``None`` when its data is absent or has no finite value, so the
report can skip the section with a note instead of drawing an empty axis. Figures are
drawn with seaborn on the Agg backend at a modest dpi so the HTML page stays light.
"""

from __future__ import annotations

import base64
import io
import re
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402

from pipeline.report.data import equilibrium_onset  # noqa: E402

DPI = 100
MAX_LAYER_LABELS = 40
MAX_STEP_LABELS = 12
PHASE_COLOURS = {"warmup": "#1f77b4", "constant": "#2ca02c", "decay": "#d62728"}
ENGINE_PALETTE = ("#4c72b0", "#dd8452", "#8c8c8c", "#55a868")

sns.set_theme(style="whitegrid", context="notebook", font_scale=0.85)


def axis_label(da: xr.DataArray, fallback: str | None = None) -> str:
    """``"<long_name> [<units>]"`` from the variable's attrs (name when no long_name)."""
    name = da.attrs.get("long_name") or fallback or str(da.name)
    units = da.attrs.get("units")
    return f"{name} [{units}]" if units else str(name)


def figure_to_data_uri(fig) -> str:
    """Encode a figure as a base64 PNG ``data:`` URI and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def lr_phases(step: np.ndarray, lr: np.ndarray) -> list[tuple[float, float, str]]:
    """Split a learning-rate schedule into (start_step, end_step, phase) segments.

    Each interval between consecutive logged steps is classed ``warmup`` (LR rises),
    ``constant`` or ``decay`` (LR falls); a change counts when it exceeds 2 % of the
    median nonzero change (and 1e-6 of the peak LR), so smooth schedules are not split by
    rounding. Consecutive intervals of one class form a segment. NaN LRs are dropped;
    fewer than two finite points give no segments.
    """
    step, lr = np.asarray(step, float), np.asarray(lr, float)
    ok = np.isfinite(step) & np.isfinite(lr)
    step, lr = step[ok], lr[ok]
    if len(lr) < 2:
        return []
    d = np.diff(lr)
    moving = np.abs(d[np.abs(d) > 0])
    tol = max(1e-6 * np.max(np.abs(lr)), 0.02 * np.median(moving) if len(moving) else 0.0)
    cls = np.where(d > tol, "warmup", np.where(d < -tol, "decay", "constant"))
    segments, start = [], 0
    for i in range(1, len(cls) + 1):
        if i == len(cls) or cls[i] != cls[start]:
            segments.append((float(step[start]), float(step[i]), str(cls[start])))
            start = i
    return segments


def block_prefix(name: str) -> str:
    """Module block of a parameter name: up to the last ``.<number>``.

    ``layers.3.attn.q`` -> ``layers.3``; a name without a number drops its last part.
    """
    m = re.match(r"^(.*\.\d+)(\.|$)", name)
    return m.group(1) if m else name.rsplit(".", 1)[0]


def layer_ticks(
    names: list[str], max_labels: int = MAX_LAYER_LABELS
) -> tuple[list[int], list[str]]:
    """Positions and labels for a layer axis that stays legible at any layer count.

    All names when few; otherwise the block prefix at the first row of each block when
    there are few enough blocks, else every k-th name.
    """
    n = len(names)
    if n <= max_labels:
        return list(range(n)), list(names)
    blocks = [block_prefix(x) for x in names]
    starts = [i for i in range(n) if i == 0 or blocks[i] != blocks[i - 1]]
    if 1 < len(starts) <= max_labels:
        return starts, [blocks[i] for i in starts]
    k = int(np.ceil(n / max_labels))
    pos = list(range(0, n, k))
    return pos, [names[i] for i in pos]


def depth_order(ds: xr.Dataset) -> np.ndarray:
    """Index that puts layers in depth order (stable, store order when no ``depth``)."""
    if "depth" in ds.coords:
        return np.argsort(np.asarray(ds["depth"].values, float), kind="stable")
    return np.arange(ds.sizes["layer"])


def _finite_range(values: np.ndarray, log: bool) -> tuple[float, float] | None:
    ok = np.isfinite(values) & ((values > 0) if log else True)
    if not ok.any():
        return None
    lo, hi = float(values[ok].min()), float(values[ok].max())
    if lo == hi:
        lo, hi = (
            (lo / 1.5, hi * 1.5)
            if log
            else (lo - 0.5 * abs(lo) - 1e-12, hi + 0.5 * abs(hi) + 1e-12)
        )
    return lo, hi


def _thin_xticks(ax, labels: np.ndarray, max_labels: int = MAX_STEP_LABELS) -> None:
    k = max(1, int(np.ceil(len(labels) / max_labels)))
    pos = np.arange(0, len(labels), k)
    ax.set_xticks(pos + 0.5)
    ax.set_xticklabels([str(labels[i]) for i in pos], rotation=0)


def layer_step_map(ds: xr.Dataset, var: str, log: bool, title: str, cmap: str = "magma"):
    """Heatmap of ``ds[var]`` (layer x time), rows in depth order.

    LogNorm colour scale when ``log`` (non-positive values masked); NaN masked grey; LR
    phase boundaries as dashed vertical lines; equilibrium onset per layer as a marker.
    """
    if var not in ds or "layer" not in ds[var].dims or ds[var].ndim != 2:
        return None
    da = ds[var]
    xdim = next(d for d in da.dims if d != "layer")
    order = depth_order(ds)
    da = da.isel(layer=order).transpose("layer", xdim)
    values = np.asarray(da.values, float)
    rng = _finite_range(values, log)
    if rng is None:
        return None
    mask = ~np.isfinite(values) | ((values <= 0) if log else False)
    names = [str(x) for x in da["layer"].values]
    n_layers, n_x = values.shape
    height = float(np.clip(2.2 + 0.16 * n_layers, 3.2, 14))
    fig, ax = plt.subplots(figsize=(11, height), layout="constrained")
    ax.set_facecolor("#b0b0b0")
    ax.grid(False)
    norm = LogNorm(*rng) if log else Normalize(*rng)
    sns.heatmap(
        values,
        mask=mask,
        norm=norm,
        cmap=cmap,
        ax=ax,
        xticklabels=False,
        yticklabels=False,
        rasterized=True,
        # the colour bar is as tall as the figure: wrap its label to fit (long names overran it)
        cbar_kws={"label": textwrap.fill(axis_label(da, var), int(12 * height))},
    )
    pos, labels = layer_ticks(names)
    ax.set_yticks(np.asarray(pos) + 0.5)
    ax.set_yticklabels(labels, fontsize=7 if n_layers > 20 else 8)
    xcoord = da[xdim].values
    _thin_xticks(ax, xcoord)
    ax.set_xlabel(xdim)
    ax.set_ylabel("layer (depth order)")
    if xdim == "step":
        _mark_phases(ax, ds, xcoord)
        _mark_equilibrium(ax, ds, order, xcoord)
    ax.set_title(title)
    return fig


def _mark_phases(ax, ds: xr.Dataset, steps: np.ndarray) -> None:
    if "learning_rate" not in ds.coords and "learning_rate" not in ds:
        return
    segments = lr_phases(ds["step"].values, ds["learning_rate"].values)
    for start, _end, phase in segments[1:]:
        x = np.searchsorted(steps, start) + 0.5
        ax.axvline(x, color=PHASE_COLOURS[phase], ls="--", lw=1.4)
        ax.text(
            x,
            -0.01,
            f" {phase}",
            color=PHASE_COLOURS[phase],
            fontsize=7,
            transform=ax.get_xaxis_transform(),
            va="top",
            ha="left",
        )


def _mark_equilibrium(ax, ds: xr.Dataset, order: np.ndarray, steps: np.ndarray) -> None:
    onset = equilibrium_onset(ds)
    if onset is None:
        return
    onset = np.asarray(onset.values, float)[order]
    ok = np.isfinite(onset) & (onset >= 0)
    if not ok.any():
        return
    cols = np.searchsorted(steps, onset[ok]) + 0.5
    rows = np.flatnonzero(ok) + 0.5
    size = float(np.clip(600 / len(order), 4, 40))
    ax.scatter(
        cols,
        rows,
        marker="D",
        s=size,
        c="#00e5ff",
        edgecolors="black",
        linewidths=0.5,
        label="equilibrium onset",
        zorder=3,
    )
    ax.figure.legend(loc="outside lower right", fontsize=7)


def global_curves(runs: dict[str, xr.Dataset]):
    """Global temperature, loss and learning rate vs step, one line per run (log y if positive)."""
    panels = ("global_temperature", "loss", "learning_rate")
    if not any(
        v in ds.variables and np.isfinite(ds[v].values.astype(float)).any()
        for ds in runs.values()
        for v in panels
    ):
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 7.5), sharex=True, layout="constrained")
    colours = sns.color_palette("viridis", max(len(runs), 1))
    for ax, var in zip(axes, panels):
        label, positive, drawn = var.replace("_", " "), True, False
        for colour, (run, ds) in zip(colours, runs.items()):
            if var not in ds.variables or "step" not in ds[var].dims:
                continue
            y = np.asarray(ds[var].values, float)
            if not np.isfinite(y).any():
                continue
            ax.plot(ds["step"].values, y, marker=".", ms=4, color=colour, label=run)
            units = ds[var].attrs.get("units")
            label, drawn = var.replace("_", " ") + (f" [{units}]" if units else ""), True
            positive &= bool(np.all(y[np.isfinite(y)] > 0))
        if drawn and positive:
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, "not available", transform=ax.transAxes, ha="center", color="0.4")
        ax.set_ylabel(label)
    handles, _ = max(axes, key=lambda a: len(a.lines)).get_legend_handles_labels()
    if handles:
        fig.legend(handles=handles, loc="outside lower center", fontsize=7, ncol=min(len(runs), 6))
    axes[-1].set_xlabel("step")
    fig.suptitle("Global temperature [loss units], loss and learning rate vs step")
    return fig


def _layer_axis(ax, names: list[str]) -> None:
    pos, labels = layer_ticks(names, max_labels=30)
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_xlabel("layer (depth order)")


def layer_mean(ds: xr.Dataset, var: str, order: np.ndarray) -> np.ndarray | None:
    """Per-layer values in ``order``, the NaN-skipping mean over any other dim; None if absent."""
    if var not in ds or "layer" not in ds[var].dims:
        return None
    da = ds[var].astype(float)
    other = [d for d in da.dims if d != "layer"]
    if other:
        da = da.mean(other, skipna=True)
    return np.asarray(da.values, float)[order]


def efficiency_bars(ds: xr.Dataset, run: str):
    """Per-layer activation work efficiency coloured by engine type.

    With the Carnot bound (neighbour layer) and the realized efficiency work/(work+heat).
    """
    order = depth_order(ds)
    work = layer_mean(ds, "work_efficiency", order)
    if work is None or not np.isfinite(work).any():
        return None
    names = [str(x) for x in ds["layer"].values[order]]
    engine = (
        np.asarray(ds["engine_type"].values).astype(str)[order]
        if "engine_type" in ds
        else np.full(len(order), "unknown")
    )
    fig, ax = plt.subplots(figsize=(11, 3.8), layout="constrained")
    x = np.arange(len(order))
    kinds = list(dict.fromkeys(engine[np.isfinite(work)]))  # no legend entry without a bar
    for kind, colour in zip(kinds, ENGINE_PALETTE * (len(kinds) // 4 + 1)):
        sel = engine == kind
        ax.bar(x[sel], work[sel], color=colour, width=0.85, label=f"work efficiency: {kind}")
    for var, style in (
        ("carnot_efficiency", dict(marker="_", color="black", s=120)),
        ("realized_efficiency", dict(marker="D", color="white", edgecolors="black", s=22)),
    ):
        y = layer_mean(ds, var, order)
        if y is not None and np.isfinite(y).any():
            ax.scatter(x, y, label=axis_label(ds[var], var), zorder=3, **style)
    _layer_axis(ax, names)
    ax.set_ylabel("efficiency [1]")
    ax.set_title(f"Heat-engine efficiency per layer [dimensionless] — {run}")
    ax.legend(fontsize=7, loc="upper right", framealpha=0.8)
    return fig


def work_heat_bars(ds: xr.Dataset, run: str):
    """Total work and heat per layer over the run (sums over steps), side by side."""
    order = depth_order(ds)
    sums = {}
    for var in ("work", "heat"):
        if var in ds and "layer" in ds[var].dims:
            da = ds[var].astype(float)
            other = [d for d in da.dims if d != "layer"]
            total = da.sum(other, skipna=True, min_count=1) if other else da
            sums[var] = (np.asarray(total.values, float)[order], ds[var].attrs.get("units", ""))
    if not sums or not any(np.isfinite(v).any() for v, _ in sums.values()):
        return None
    names = [str(x) for x in ds["layer"].values[order]]
    fig, ax = plt.subplots(figsize=(11, 3.8), layout="constrained")
    x = np.arange(len(order))
    width = 0.8 / len(sums)
    for i, (var, (vals, _)) in enumerate(sums.items()):
        ax.bar(
            x + (i - (len(sums) - 1) / 2) * width,
            vals,
            width=width,
            label=var,
            color=("#c44e52" if var == "heat" else "#4c72b0"),
        )
    ax.axhline(0, color="black", lw=0.6)
    _layer_axis(ax, names)
    units = next(iter(sums.values()))[1] or "loss"
    ax.set_ylabel(f"sum over steps [{units}]")
    ax.set_title(f"First law per layer: total work and heat [{units}] — {run}")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def sweep_power_law(lr: xr.DataArray, temp: xr.DataArray, b: float = np.nan, k: float = np.nan):
    """Temperature vs learning rate across runs (log-log) with the fitted T = b * lr^k."""
    lrv, tv = np.asarray(lr.values, float), np.asarray(temp.values, float)
    ok = np.isfinite(lrv) & np.isfinite(tv) & (lrv > 0) & (tv > 0)
    if not ok.any():
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    ax.scatter(lrv[ok], tv[ok], s=40, color="#c44e52", zorder=3, label="runs")
    dim = temp.dims[0] if temp.ndim == 1 else None
    if dim is not None and dim in temp.coords:
        for name, xv, yv in zip(np.asarray(temp[dim].values)[ok], lrv[ok], tv[ok]):
            ax.annotate(str(name), (xv, yv), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if np.isfinite(b) and np.isfinite(k):
        grid = np.geomspace(lrv[ok].min() / 1.3, lrv[ok].max() * 1.3, 50)
        ax.plot(grid, b * grid**k, color="black", lw=1, label=f"fit T = {b:.3g} lr^{k:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(axis_label(lr, "learning rate"))
    ax.set_ylabel(axis_label(temp, "temperature"))
    ax.set_title(
        f"Temperature [{temp.attrs.get('units', 'loss')}] vs learning rate "
        "across the sweep (log-log)"
    )
    ax.legend(fontsize=8, loc="upper left")
    return fig


def free_energy_points(u: xr.DataArray, s: xr.DataArray, labels: list[str]):
    """Stationary (S, U) points; the slope between two points is a free-energy temperature."""
    uv, sv = np.asarray(u.values, float).ravel(), np.asarray(s.values, float).ravel()
    ok = np.isfinite(uv) & np.isfinite(sv)
    if not ok.any():
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    order = np.argsort(sv[ok], kind="stable")  # chords between S-sorted neighbours (METHODS 5b)
    ax.plot(sv[ok][order], uv[ok][order], color="0.6", lw=0.8, zorder=1)
    ax.scatter(sv[ok], uv[ok], s=40, color="#4c72b0", zorder=3)
    for name, xv, yv in zip(np.asarray(labels, dtype=object)[ok], sv[ok], uv[ok]):
        ax.annotate(str(name), (xv, yv), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(textwrap.fill(axis_label(s, "S"), 80))  # long names overran the figure
    ax.set_ylabel(textwrap.fill(axis_label(u, "U"), 50))
    ax.set_title(
        f"Free energy F = U - T S: energy [{u.attrs.get('units', 'loss')}] vs entropy "
        f"[{s.attrs.get('units', 'nats')}]"
    )
    return fig
