"""Windows, reason codes and the identifiability mask of the local temperature.

A coarse series (15 checkpoints) must get a temperature for >= 80% of its later cells; every
cell without one carries the reason; masked values reach nothing downstream (global T, spread).
Series are real safetensors files written by the Langevin simulator.
"""

import numpy as np
import pytest
import xarray as xr

from pipeline.core.reasons import TEMPERATURE_REASONS as R_TEXT
from pipeline.core.reasons import TemperatureReason as R
from pipeline.estimators.displacement import checkpoint_windows, diffusivity_from_band
from pipeline.testing.simulate import LayerSpec, reference_band, simulate_quadratic_series
from pipeline.thermo.temperature import add_global_temperature, add_temperature

LR = 0.01
SIGMAS = (0.01, 0.02, 0.03)


def test_checkpoint_windows_centred_shrinking_at_the_ends():
    start, end = checkpoint_windows(15, 8, min_window=4)
    assert list(end - start) == [4, 5, 6, 7] + [8] * 7 + [7, 6, 5, 4]
    assert np.all((start <= np.arange(15)) & (np.arange(15) <= end))  # each window holds its step
    assert start.min() == 0 and end.max() == 14
    # too short a series: no window at all; trailing windows keep the old meaning
    assert (checkpoint_windows(4, 8, min_window=4)[0] == -1).all()
    ts, te = checkpoint_windows(10, 8)
    assert list(ts) == [-1] * 8 + [0, 1] and list(te) == list(range(10))


def _series(tmp_path, n_checkpoints=15, spacing=20, kappa=0.1, decades=2.0):
    """Constant-LR Langevin series; the stiffest direction relaxes by kappa per interval."""
    h_max = kappa / (LR * spacing)
    specs = [
        LayerSpec(
            noise_std=s,
            curvature_min=h_max / 10**decades,
            curvature_decades=decades,
            drift_gradient=0.3 * s,
        )
        for s in SIGMAS
    ]
    return simulate_quadratic_series(
        tmp_path,
        specs,
        [((n_checkpoints - 1) * spacing, LR)],
        checkpoint_every=spacing,
        n_checkpoints=n_checkpoints,
        seed=3,
    )


def _run_dataset(truth, max_lag=8, lr_log=True) -> xr.Dataset:
    """The measured variables thermo reads, from the simulator's files (reference band)."""
    bands = [reference_band(truth.files, name, max_lag) for name in truth.layer_names]
    d2 = np.stack([b for b, _ in bands], axis=1)
    msd = d2[:, :, 0] / np.array([n for _, n in bands])[None, :]
    steps = truth.steps
    lr = np.where(steps > 0, LR, np.nan) if lr_log else np.full(steps.size, np.nan)
    return xr.Dataset(
        {
            "sq_distance": (("step", "layer", "lag"), d2),
            "msd": (("step", "layer"), msd),
            "rounding_noise_var": (("step", "layer"), np.zeros(msd.shape)),
            "log_learning_rate": ("log_step", lr),
        },
        coords={
            "step": steps,
            "layer": truth.layer_names,
            "lag": np.arange(1, max_lag + 1),
            "log_step": steps,
            "n_params": ("layer", np.array([n for _, n in bands])),
        },
    )


def test_fifteen_checkpoints_get_a_map(tmp_path):
    """>= 80% of (layer, step) cells after the first 20% have T and its error, within 10%;
    the trailing window of the old estimator gave 58%."""
    truth = _series(tmp_path)
    ds = add_temperature(_run_dataset(truth), 8, min_window=4)
    late = np.arange(15) >= 3
    temp, err = ds.temperature.values[late], ds.temperature_err.values[late]
    have = np.isfinite(temp) & np.isfinite(err) & (err > 0)
    rel = temp / truth.temperature[None, :, 0] - 1
    z = (temp - truth.temperature[None, :, 0]) / err
    print(
        f"\n[15 checkpoints] cells with T: {have.mean():.2f}; mean |rel err| "
        f"{np.nanmean(abs(rel)):.3f}, max {np.nanmax(abs(rel)):.3f}; "
        f"max |z| {np.nanmax(abs(z)):.2f}"
    )
    assert have.mean() >= 0.8
    assert np.nanmean(np.abs(rel)) < 0.05 and np.nanmax(np.abs(rel)) < 0.15
    assert np.nanmax(np.abs(z)) < 4  # the stated error covers the actual error
    # the honest error: the end windows (4 intervals) are wider than the interior (8)
    rel_err = ds.temperature_err.values / ds.temperature.values
    assert np.all(rel_err[[0, -1]] > rel_err[7])
    trailing = add_temperature(_run_dataset(truth), 8)
    assert np.isfinite(trailing.temperature.values[late]).mean() < 0.6


def test_every_masked_cell_has_its_reason(tmp_path):
    """Too few checkpoints, no LR log, spacing longer than the relaxation time: NaN + reason."""
    short = add_temperature(_run_dataset(_series(tmp_path / "a", n_checkpoints=4)), 8, min_window=4)
    assert np.isnan(short.temperature).all()
    assert (short.temperature_reason == R.TOO_FEW_CHECKPOINTS).all()

    no_log = add_temperature(_run_dataset(_series(tmp_path / "b"), lr_log=False), 8, min_window=4)
    assert np.isnan(no_log.temperature).all()
    assert (no_log.temperature_reason == R.NO_LR_LOG).all()
    assert np.isfinite(no_log.diffusivity).all()  # D is still reported without the LR

    # every valley direction relaxes within one interval (lr h spacing from 3 to 30)
    series = _series(tmp_path / "c", spacing=1000, kappa=30.0, decades=1.0)
    coarse = add_temperature(_run_dataset(series), 8, min_window=4)
    reason = coarse.temperature_reason.values
    assert (reason == R.SPACING_TOO_COARSE).mean() > 0.9
    assert np.all(np.isnan(coarse.temperature.values[reason != 0]))
    assert np.all(np.isfinite(coarse.temperature.values[reason == 0]))
    assert set(np.unique(reason)) <= {int(r) for r in R}

    # the run's optimizer relation refused (AdamW named, no optimizer state): every cell with a
    # window says so (4), not its own 2/7; cells without any window keep 1 (precedence: reasons)
    refused = add_temperature(_run_dataset(series), 8, optimizer="adamw")
    assert str(refused.temperature_refusal.values)
    reason = refused.temperature_reason.values
    assert (reason[:8] == R.TOO_FEW_CHECKPOINTS).all()  # trailing windows: none before step 8
    assert (reason[8:] == R.OPTIMIZER_STATE_MISSING).all()
    assert np.isnan(refused.temperature.values).all()


def test_masked_layers_do_not_enter_global_temperature(tmp_path):
    truth = _series(tmp_path)
    ds = add_temperature(_run_dataset(truth), 8, min_window=4)
    temp = ds.temperature.values.copy()
    temp[:, 0] = 1e3  # a wild value in layer 0 ...
    reason = ds.temperature_reason.values.copy()
    reason[:, 0] = R.SPACING_TOO_COARSE  # ... which the mask refuses
    masked = ds.assign(
        temperature=(("step", "layer"), np.where(reason == 0, temp, np.nan)),
        temperature_reason=(("step", "layer"), reason),
    )
    glob = add_global_temperature(masked)
    want = np.nanmean(ds.temperature.values[:, 1:], axis=1)  # equal n: plain mean of the rest
    np.testing.assert_allclose(glob.global_temperature.values, want, rtol=1e-12)
    np.testing.assert_allclose(glob.global_temperature_coverage.values, 2 / 3)
    # below half the parameters identified: no global T at all
    only_one = masked.assign(
        temperature=masked.temperature.where(masked.layer == "layers.2.weight")
    )
    assert np.isnan(add_global_temperature(only_one).global_temperature).all()


@pytest.mark.parametrize("n_params", [0])
def test_empty_layer_is_refused(n_params):
    steps = np.arange(10) * 5
    res = diffusivity_from_band(steps, np.ones((10, 8)), n_params, 8, min_window=4)
    assert np.isnan(res["diffusivity"]).all() and not res["identifiable"].any()


def test_check_forecasts_identifiable_cells_before_measuring(tmp_path):
    """``thermoscope check``: from the files alone, how many cells can get T and why not."""
    from pipeline.ingest.validate import check_and_plan, format_forecast

    _series(tmp_path / "full")  # 15 checkpoints with an LR log
    _series(tmp_path / "short", n_checkpoints=4)
    (tmp_path / "nolog").mkdir()
    _series(tmp_path / "nolog")
    (tmp_path / "nolog" / "log.csv").unlink()
    got = {}
    for name in ("full", "short", "nolog"):
        _, plan = check_and_plan(tmp_path / name)
        (row,) = plan["forecast"]
        got[name] = row
    assert got["full"]["possible"] == got["full"]["cells"] == 15 * 3
    assert got["short"]["possible"] == 0
    assert got["short"]["refused"] == {R_TEXT[1]: 4 * 3}
    assert got["nolog"]["possible"] == 0 and got["nolog"]["refused"] == {R_TEXT[3]: 15 * 3}
    text = format_forecast([got["short"]])
    assert "0 of 12 (layer, step) cells" in text and "too few checkpoints" in text


def test_check_forecasts_the_momentum_spacing_refusal(tmp_path):
    """AdamW (beta1 0.9, a 9.5-step momentum offset) saved every 10 steps: the thermo relation
    refuses the run's T, and ``check`` says so from the optimizer state before measuring (it
    said 100% identifiable on such a Trainer run); every 40 steps passes the same rule."""
    from pipeline.ingest.validate import check_and_plan, format_forecast
    from pipeline.testing.optim_series import QuadraticLayer, simulate_optimizer_series

    layers = [QuadraticLayer("a.weight", (8, 16), 1.0), QuadraticLayer("b.weight", (16, 8), 2.0)]
    rows = {}
    for every in (10, 40):
        out = tmp_path / f"every{every}"
        simulate_optimizer_series(out, layers, plateaus=((640, 1e-3),), save_every=every)
        _, plan = check_and_plan(out)
        (rows[every],) = plan["forecast"]
    close = rows[10]
    assert close["possible"] == 0 and close["cells"] == 64 * 2
    assert "save at least every 38 steps" in close["optimizer"]
    assert "momentum shortens the displacement by 9.5 steps" in format_forecast([close])
    assert rows[40]["optimizer"] == "" and rows[40]["possible"] > 0


def test_check_forecasts_the_sgd_clipping_refusal(tmp_path):
    """Plain SGD whose logged grad_norm (the Trainer's, before clipping) exceeds
    thermo.max_grad_norm at most steps: the relation refuses T (the step is not lr), and
    ``check`` forecasts it from trainer_state.json; below the threshold nothing is refused."""
    import contextlib
    import json

    from pipeline.ingest.validate import check_and_plan
    from pipeline.testing.optim_series import QuadraticLayer, simulate_optimizer_series

    layers = [QuadraticLayer("a.weight", (8, 16), 1.0)]
    rows = {}
    for norm in (5.0, 0.5):
        out = tmp_path / f"norm{norm}"
        simulate_optimizer_series(out, layers, kind="sgd", plateaus=((640, 1e-2),))
        for state in out.rglob("trainer_state.json"):
            doc = json.loads(state.read_text())
            for entry in doc["log_history"]:
                entry["grad_norm"] = norm
            state.write_text(json.dumps(doc))
        _, plan = check_and_plan(out)
        (rows[norm],) = plan["forecast"]
    assert rows[5.0]["possible"] == 0
    assert rows[5.0]["optimizer"].startswith("gradient clipped (grad_norm > 1.0) at 100%")
    assert rows[0.5]["optimizer"] == "" and rows[0.5]["possible"] > 0
    # a run that never clipped: thermo.max_grad_norm null (check --params) lifts the refusal
    from pipeline.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("thermo:\n  max_grad_norm: null\n")
    for extra, identifiable in (([], 0), (["--params", str(params)], rows[0.5]["possible"])):
        out = tmp_path / f"check{len(extra)}.json"
        argv = ["--json-log", "check", str(tmp_path / "norm5.0"), *extra]
        with open(out, "w") as err, contextlib.redirect_stderr(err):
            main(argv)
        done = [json.loads(x) for x in out.read_text().splitlines() if "identifiable" in x]
        assert list(done[-1]["identifiable_cells"].values())[0][0] == identifiable
