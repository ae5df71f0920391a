"""The report: self-contained page, section order, metrics/plots equal to the store, atomic
writes, and robustness (missing variables, all-NaN temperature, one step, 250 layers)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from PIL import Image
from report_fixture import build_store

from pipeline.core.errors import InputError
from pipeline.report.figures import layer_ticks, lr_phases
from pipeline.report.render import render_report

SECTION_ORDER = [
    "summary",
    "temperature-map",
    "weight_entropy-map",
    "global-curves",
    "efficiency",
    "work-heat",
    "sweep",
    "free-energy",
    "layers",
    "nonfinite",
    "skipped",
]
SKIPPED = [["ckpt/step-77/model.safetensors", "truncated header"]]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "store.zarr"
    return build_store(path, n_runs=2, nonfinite_at=(5, 2), skipped=SKIPPED)


@pytest.fixture(scope="module")
def report(store, tmp_path_factory) -> Path:
    return render_report(store, tmp_path_factory.mktemp("out") / "report")


def sections(page: str) -> dict[str, str]:
    """Section id -> its HTML, in page order."""
    found = re.findall(r'<section id="([^"]+)">(.*?)</section>', page, flags=re.S)
    return dict(found)


def images(fragment: str) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(b64)))
        for b64 in re.findall(r'src="data:image/png;base64,([^"]+)"', fragment)
    ]


# ---------------------------------------------------------------- the page


def test_page_is_self_contained(report):
    page = report.read_text()
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page, flags=re.I)
    assert not re.search(r"<script[^>]*\bsrc=", page, flags=re.I)
    assert "<link" not in page.lower() and "@import" not in page and "url(" not in page
    for src in re.findall(r'src="([^"]*)"', page):
        assert src.startswith("data:image/png;base64,")
    assert "<style>" in page and "<script>" in page


def test_sections_in_order_temperature_map_first(report):
    page = report.read_text()
    found = sections(page)
    assert list(found) == SECTION_ORDER
    first_img = page.index("<img")
    assert page.index('id="temperature-map"') < first_img < page.index('id="weight_entropy-map"')
    assert len(images(found["temperature-map"])) == 2  # one map per run
    assert len(images(found["weight_entropy-map"])) == 2
    for sid in ("global-curves", "efficiency", "work-heat", "sweep", "free-energy"):
        assert images(found[sid]), sid
    assert page.count("<figcaption>") == page.count("<img")


def test_figures_are_titled_with_units_and_light(report):
    page = report.read_text()
    assert "layer temperature [loss] per layer" in page.replace("&#x27;", "'") or "[loss]" in page
    for img in images(page):
        assert img.info.get("dpi", (100, 100))[0] == pytest.approx(100, abs=1)
        assert img.size[0] <= 1200 and img.size[1] <= 1500
    assert len(page) < 1_500_000


def test_summary_table_and_highlights(report, store):
    page = report.read_text()
    found = sections(page)
    ds = xr.open_datatree(store, engine="zarr")["lr_0.02"].to_dataset()
    peak_step = int(ds.global_temperature.idxmax())
    assert f"@ {peak_step}" in found["summary"]
    n_eq = int(np.isfinite(ds.equilibrium_step).sum())
    assert n_eq > 0 and f"{n_eq}/6 layers" in found["summary"]
    assert "warmup" in found["summary"] and "decay" in found["summary"]
    log = "lightning_logs/version_0/metrics.csv (loss: train_loss, LR: lr-AdamW)"
    assert log in found["summary"]
    assert 'class="bad"' in found["nonfinite"] and "blocks.1.weight" in found["nonfinite"]
    assert '<tr class="bad">' in found["layers"]
    assert SKIPPED[0][0] in found["skipped"] and SKIPPED[0][1] in found["skipped"]
    assert 'class="sortable"' in found["layers"]
    n_rows = found["layers"].count("<tr") - 1
    assert n_rows == 2 * 6


# ---------------------------------------------------------------- metrics and plots


def test_metrics_equal_values_recomputed_from_store(report, store):
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
    tree = xr.open_datatree(store, engine="zarr")
    for run in ("lr_0.02", "lr_0.04"):
        ds = tree[run].to_dataset()
        gt = ds.global_temperature.dropna("step")
        expected = {
            "n_steps": ds.sizes["step"],
            "n_layers": ds.sizes["layer"],
            "global_temperature_last": float(gt[-1]),
            "global_temperature_last_step": int(gt.step[-1]),
            "global_temperature_peak": float(gt.max()),
            "global_temperature_peak_step": int(ds.global_temperature.idxmax()),
            "temperature_spread_last": float(ds.temperature_spread.dropna("step")[-1]),
            "final_loss": float(ds.loss.dropna("step")[-1]),
            "min_loss": float(ds.loss.min()),
            "mean_temperature": float(ds.temperature.mean()),
            "mean_weight_entropy": float(ds.weight_entropy.mean()),
            "nonfinite_total": int(ds.nonfinite_count.sum()),
            "equilibrated_layers": int(np.isfinite(ds.equilibrium_step).sum()),
        }
        for key, value in expected.items():
            assert metrics[f"{run}.{key}"] == pytest.approx(value, rel=1e-12), key
    assert metrics["lr_0.02.nonfinite_total"] == 7
    sweep = tree["sweep"].to_dataset()
    assert metrics["sweep.fit_k"] == pytest.approx(float(sweep.fit_k), rel=1e-12)
    assert metrics["sweep.fit_b"] == pytest.approx(float(sweep.fit_b), rel=1e-12)


def test_plot_tables_equal_store(report, store):
    plots = report.parent / "plots"
    tree = xr.open_datatree(store, engine="zarr")
    for run in ("lr_0.02", "lr_0.04"):
        ds = tree[run].to_dataset()
        glob = pd.read_csv(plots / f"{run}.global.csv")
        assert list(glob.columns) == ["step", "global_temperature", "loss", "learning_rate"]
        np.testing.assert_array_equal(glob.step, ds.step)
        for col in ("global_temperature", "loss", "learning_rate"):
            np.testing.assert_allclose(glob[col], ds[col], rtol=1e-12, equal_nan=True)
        long = pd.read_csv(plots / f"{run}.layer_temperature.csv")
        assert list(long.columns) == ["step", "layer", "temperature"]
        assert len(long) == ds.sizes["step"] * ds.sizes["layer"]
        back = long.set_index(["step", "layer"]).temperature.to_xarray().sel(layer=ds.layer)
        np.testing.assert_allclose(back.values, ds.temperature.values, rtol=1e-12, equal_nan=True)
    sweep = pd.read_csv(plots / "sweep.temperature_vs_lr.csv")
    np.testing.assert_allclose(sweep.lr, tree["sweep"].to_dataset().run_learning_rate, rtol=1e-12)
    np.testing.assert_allclose(
        sweep.temperature, tree["sweep"].to_dataset().run_temperature, rtol=1e-12
    )
    both = pd.read_csv(plots / "global.csv")  # the files dvc.yaml names: all runs, a run column
    assert (
        set(both.run) == {"lr_0.02", "lr_0.04"} and len(both) == 2 * tree["lr_0.02"].sizes["step"]
    )
    long = pd.read_csv(plots / "layer_temperature.csv")
    assert {"step", "layer", "temperature", "run"} <= set(long.columns)
    assert len(long) == 2 * tree["lr_0.02"].sizes["step"] * tree["lr_0.02"].sizes["layer"]


# ---------------------------------------------------------------- atomicity


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_failure_midway_leaves_old_report_byte_identical(store, report, tmp_path):
    out = tmp_path / "report"
    shutil.copytree(report.parent, out)
    before = snapshot(out)
    broken = tmp_path / "broken.zarr"
    shutil.copytree(store, broken)
    chunks = [
        p
        for p in (broken / "lr_0.04" / "weight_entropy").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    ]
    assert chunks
    for chunk in chunks:  # opens lazily, fails when the data are read (after the temp dir exists)
        chunk.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(InputError, match=r"broken\.zarr: cannot read node 'lr_0\.04'"):
        render_report(broken, out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "broken.zarr",
        "report",
    ]  # temp dir removed


def test_missing_store_is_input_error(tmp_path):
    with pytest.raises(InputError, match="store not found"):
        render_report(tmp_path / "nope.zarr", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rerender_replaces_stale_plot_files(store, report, tmp_path):
    out = tmp_path / "report"
    shutil.copytree(report.parent, out)
    (out / "plots" / "gone_run.global.csv").write_text("step\n1\n")
    single = build_store(tmp_path / "one.zarr", n_runs=1, n_layers=2, n_steps=3)
    render_report(single, out)
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "global.csv",
        "layer_temperature.csv",
        "lr_0.02.global.csv",
        "lr_0.02.layer_temperature.csv",
    ]
    assert not any(k.startswith("lr_0.04") for k in json.loads((out / "metrics.json").read_text()))


# ---------------------------------------------------------------- robustness

DROPPED = (
    "temperature",
    "diffusivity",
    "global_temperature",
    "temperature_spread",
    "work_efficiency",
    "carnot_efficiency",
    "realized_efficiency",
    "engine_type",
    "work",
    "heat",
    "equilibrium_step",
    "equilibrated",
    "nonfinite_count",
)


def test_missing_variables_skip_sections_with_a_note(tmp_path):
    path = build_store(
        tmp_path / "s.zarr",
        n_runs=1,
        n_layers=4,
        n_steps=8,
        drop=DROPPED,
        all_nan=("learning_rate",),
    )
    page = render_report(path, tmp_path / "out").read_text()
    found = sections(page)
    assert list(found) == SECTION_ORDER
    assert "not in the store; map skipped" in found["temperature-map"].replace("&#x27;", "'")
    assert images(found["weight_entropy-map"]) and images(found["global-curves"])
    for sid in ("efficiency", "work-heat", "sweep", "free-energy"):
        assert 'class="note"' in found[sid] and not images(found[sid]), sid
    assert "not computed" in found["summary"] and "no LR log" in found["summary"]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "lr_0.02.final_loss" in metrics and "lr_0.02.global_temperature_last" not in metrics
    glob = pd.read_csv(tmp_path / "out" / "plots" / "lr_0.02.global.csv")
    assert "global_temperature" not in glob.columns


def test_all_nan_temperature(tmp_path):
    path = build_store(
        tmp_path / "s.zarr",
        n_runs=1,
        n_layers=4,
        n_steps=6,
        all_nan=("temperature", "diffusivity", "global_temperature", "temperature_spread"),
    )
    page = render_report(path, tmp_path / "out").read_text()
    found = sections(page)
    assert not images(found["temperature-map"])
    assert "no finite positive value" in found["temperature-map"]
    assert images(found["weight_entropy-map"])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert not any("temperature" in k for k in metrics) and metrics["lr_0.02.n_steps"] == 6


def test_single_step(tmp_path):
    path = build_store(tmp_path / "s.zarr", n_runs=1, n_layers=4, n_steps=1)
    page = render_report(path, tmp_path / "out").read_text()
    found = sections(page)
    assert list(found) == SECTION_ORDER
    (img,) = images(found["weight_entropy-map"])
    assert np.asarray(img.convert("L")).std() > 5
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["lr_0.02.n_steps"] == 1


def test_250_layers_stay_legible(tmp_path):
    path = build_store(tmp_path / "s.zarr", n_runs=1, n_layers=250, n_steps=6)
    page = render_report(path, tmp_path / "out").read_text()
    (tmap,) = images(sections(page)["temperature-map"])
    assert tmap.size[1] <= 14 * 100 + 50  # height capped
    pos, labels = layer_ticks(
        [f"blocks.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(250)]
    )
    assert len(labels) <= 40 and pos == sorted(pos)
    assert sections(page)["layers"].count("<tr") - 1 == 250
    assert len(page) < 1_500_000


# ---------------------------------------------------------------- helpers with known answers


def test_layer_ticks_groups_blocks_or_thins():
    few = [f"l{i}" for i in range(10)]
    assert layer_ticks(few) == (list(range(10)), few)
    grouped = [f"layers.{i // 4}.{p}" for i in range(120) for p in ("q",)][:120]
    pos, labels = layer_ticks(grouped)
    assert labels == [f"layers.{b}" for b in range(30)] and pos == list(range(0, 120, 4))
    flat = [f"w{i}" for i in range(400)]
    pos, labels = layer_ticks(flat)
    assert pos == list(range(0, 400, 10)) and labels[1] == "w10"


def test_lr_phases_recovers_known_schedules():
    steps = np.arange(0, 1001, 50)
    lr = np.interp(steps, [0, 200, 600, 1000], [0.0, 1e-3, 1e-3, 1e-4])
    assert lr_phases(steps, lr) == [
        (0, 200, "warmup"),
        (200, 600, "constant"),
        (600, 1000, "decay"),
    ]
    drop = np.where(steps <= 500, 0.1, 0.01)
    assert lr_phases(steps, drop) == [
        (0, 500, "constant"),
        (500, 550, "decay"),
        (550, 1000, "constant"),
    ]
    assert lr_phases(steps, np.full(len(steps), 3e-4)) == [(0, 1000, "constant")]
    assert lr_phases(steps, np.full(len(steps), np.nan)) == []
    assert lr_phases(steps[:1], lr[:1]) == []
    noisy = lr * (1 + 1e-9 * np.random.default_rng(0).standard_normal(len(lr)))
    assert [p for *_, p in lr_phases(steps, noisy)] == ["warmup", "constant", "decay"]


@pytest.mark.slow
def test_five_run_demo_page_stays_light(tmp_path):
    path = build_store(tmp_path / "s.zarr", n_runs=5, n_layers=24, n_steps=60)
    page = render_report(path, tmp_path / "out")
    assert page.stat().st_size < 3_000_000


def _run_without_temperature(tmp_path) -> tuple[xr.DataTree, str]:
    """A loaded one-run store (4 layers, 6 steps) whose temperatures are all NaN, and its run."""
    path = build_store(
        tmp_path / "s.zarr",
        n_runs=1,
        n_layers=4,
        n_steps=6,
        all_nan=("temperature", "global_temperature", "temperature_spread"),
    )
    tree = xr.open_datatree(path, engine="zarr").load()
    return tree, list(tree.children)[0]


def test_run_without_learning_rate_maps_the_diffusivity(tmp_path):
    """No LR log -> no temperature (never invented): the map shows the measured diffusivity."""
    tree, name = _run_without_temperature(tmp_path)
    run = tree[name].to_dataset()
    diffusivity = xr.full_like(run["weight_rms"], 1e-6).assign_attrs(
        units="weight^2/param/step", long_name="noise diffusivity D"
    )
    tree[name].dataset = run.assign(diffusivity=diffusivity)
    tree.to_zarr(tmp_path / "d.zarr", mode="w")
    found = sections(render_report(tmp_path / "d.zarr", tmp_path / "out").read_text())
    assert images(found["temperature-map"])
    assert (
        "noise diffusivity D" in found["temperature-map"]
        and "needs a learning-rate log" in found["temperature-map"]
    )


def test_refused_run_says_its_refusal_not_a_missing_log(tmp_path):
    """A run whose optimizer relation was refused (here: momentum offset vs spacing) has an LR
    log: the map's caption and every code-4 grey cell give the run's own refusal sentence
    (a reason sentence holding '; ' is decoded whole, never cut mid-parenthesis)."""
    tree, name = _run_without_temperature(tmp_path)
    run = tree[name].to_dataset()
    refusal = "checkpoints 10 steps apart: momentum shortens the displacement by 9.5 steps"
    codes = run["temperature_reason"]
    attrs = dict(codes.attrs, reasons="0: identified; 4: relation refused (a; b); 7: no signal")
    run = run.assign(
        diffusivity=xr.full_like(run["weight_rms"], 1e-6).assign_attrs(units="weight^2"),
        temperature_reason=codes.copy(data=np.full(codes.shape, 4, np.int8)).assign_attrs(attrs),
        temperature_refusal=((), refusal),
    )
    tree[name].dataset = run
    tree.to_zarr(tmp_path / "d.zarr", mode="w")
    part = sections(render_report(tmp_path / "d.zarr", tmp_path / "out").read_text())[
        "temperature-map"
    ]
    assert f"No temperature for this run ({refusal})" in part
    assert "learning-rate log" not in part
    n_layers = run.sizes["layer"]
    assert part.count(f"optimizer relation refused: {refusal} (6 steps") == n_layers
    assert "relation refused (a" not in part


def test_every_grey_cell_gives_its_reason(store, report):
    """The temperature map's grey cells are exactly the store's masked cells, and the table
    under the map names each one's reason with its steps (decoded from the store's attrs)."""
    tree = xr.open_datatree(store, engine="zarr")
    part = sections(report.read_text())["temperature-map"]
    for run in (n for n in tree.children if n != "sweep"):
        ds = tree[run].to_dataset()
        reason = ds.temperature_reason.values
        assert (np.isnan(ds.temperature.values) == (reason != 0)).all()
        have = int((reason == 0).sum())
        assert f"{run}: {have} of {reason.size} (layer, step) cells have a temperature" in part
        for j, layer in enumerate(ds.layer.values):
            masked = np.flatnonzero(reason[:, j] != 0)
            if masked.size:  # the fixture masks the first step of every layer as code 2
                assert re.search(rf"<td>{re.escape(str(layer))}</td>", part)
                why = "relaxation time (MSD saturates between lags)"
                assert f"{why} ({masked.size} steps" in part


def test_sweep_fit_per_group_says_no_fit_and_why():
    """A group whose power law is refused reads 'no fit (reason)', never 'T = – · lr^–'."""
    from pipeline.report.sections import _sweep_fit_text
    from pipeline.store.zarr_io import annotate

    sweep = annotate(
        xr.Dataset(
            {
                "fit_b": ((), 2.0),
                "fit_k": ((), 1.0),
                "fit_group": ((), "adamw"),
                "group_fit_b": ("optimizer_group", [2.0, np.nan]),
                "group_fit_k": ("optimizer_group", [1.0, np.nan]),
                "group_fit_k_reason": ("optimizer_group", np.array([0, 2], dtype=np.int8)),
            },
            coords={"optimizer_group": ["adamw", "sgd"]},
        )
    )
    text = _sweep_fit_text(sweep)
    assert "adamw: T = 2 · lr^1" in text
    assert "sgd: no fit (fewer than 2 stationary constant-LR plateaus)" in text
    assert "–" not in text


def test_free_energy_draws_only_the_fit_groups_states():
    """The (S, U) plane holds the fit group's stationary states only: with the fit group's
    points undefined, the other optimizer's points are not drawn in their place."""
    from pipeline.report.sections import free_energy_section
    from pipeline.store.zarr_io import annotate

    def sweep(u_adamw):
        return annotate(
            xr.Dataset(
                {
                    "internal_energy": ("run", [u_adamw, u_adamw - 0.2, 2.7]),
                    "run_ensemble_entropy": ("run", [-7.2e5, -6.2e5, -1.0e6]),
                    "fit_group": ((), "adamw"),
                },
                coords={
                    "run": ["adamw_a", "adamw_b", "sgd_a"],
                    "run_optimizer": ("run", ["adamw", "adamw", "sgd"]),
                },
            )
        )

    drawn = free_energy_section({}, sweep(2.5)).body
    assert images(drawn) and "Only the adamw runs (the fit group) are drawn" in drawn
    assert not images(free_energy_section({}, sweep(np.nan)).body)


def test_efficiency_legend_lists_only_drawn_engine_types():
    """Layers without a work efficiency (no activation, 1-D) draw no bar and get no legend
    entry (the GPT-2 page listed 'unknown' and 'none' beside the only drawn type)."""
    from pipeline.report.figures import efficiency_bars

    ds = xr.Dataset(
        {
            "work_efficiency": (("step", "layer"), [[np.nan, 0.7, np.nan], [np.nan, 0.69, np.nan]]),
            "engine_type": ("layer", ["none", "scale-dependent", "unknown"]),
        },
        coords={"layer": ["attn.weight", "mlp.c_fc.weight", "ln.bias"]},
    )
    fig = efficiency_bars(ds, "r")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["work efficiency: scale-dependent"]
