"""Known-answer temperatures for real torch.optim optimizers (METHODS.md 3b).

Series from ``simulate_optimizer_series`` (Hugging Face layout, real ``optimizer.pt``). Targets:
per-layer T within 10% for tensors with >= 1000 values, layers ranked exactly, the plateau
ratio within 10% of the LR ratio, and the truth equal to 2 <L_A - L_A*> / n (Lyapunov)."""

from __future__ import annotations

import html
import json
import shutil

import numpy as np
import pytest
import xarray as xr
from scipy.stats import rankdata

from pipeline.analyze import analyze
from pipeline.estimators.preconditioned import momentum_offset_steps
from pipeline.report.render import render_report
from pipeline.settings import ClusterSettings
from pipeline.testing.optim_series import QuadraticLayer, simulate_optimizer_series

LAYERS = [
    QuadraticLayer("a.weight", (32, 64), 0.5),
    QuadraticLayer("b.weight", (48, 64), 1.5),
    QuadraticLayer("c.weight", (64, 40), 3.0),
    QuadraticLayer("c.bias", (40,), 1.0),
]
BIG = [spec.name for spec in LAYERS if np.prod(spec.shape) >= 1000]
LRS = (1e-3, 3e-4)
CLUSTER = ClusterSettings(n_workers=1, processes=False)


def _run(tmp_path, thermo=None, **kw):
    src = tmp_path / "run"
    truth = simulate_optimizer_series(src, LAYERS, plateaus=tuple((1600, lr) for lr in LRS), **kw)
    return truth, _analyze(src, tmp_path, thermo)


def _analyze(src, tmp_path, thermo=None):
    store = analyze(src, tmp_path / "store.zarr", cluster=CLUSTER, thermo_params=thermo)
    return xr.open_datatree(store, engine="zarr")["run"].to_dataset()


def _plateau_estimates(truth, ds, window=8):
    """Median T per (layer in truth order, plateau) over windows inside each plateau."""
    order = [list(ds.layer.values).index(n) for n in truth.layer_names]
    steps = ds.step.values
    out = []
    for first, last, _ in truth.plateaus:
        inside = (steps - window * 40 >= first - 1) & (steps <= last)
        out.append(np.nanmedian(ds.temperature.values[inside][:, order], axis=0))
    return np.stack(out, axis=1)


def _check_targets(truth, ds):
    est = _plateau_estimates(truth, ds)
    big = [truth.layer_names.index(n) for n in BIG]
    err = est[big] / truth.temperature[big] - 1
    assert np.all(np.abs(err) < 0.10), err
    for p in range(est.shape[1]):
        assert list(rankdata(est[big, p])) == list(rankdata(truth.temperature[big, p]))
    ratio = est[big, 1] / est[big, 0]
    assert np.all(np.abs(ratio / (LRS[1] / LRS[0]) - 1) < 0.10), ratio
    # the truth is the Lyapunov one: T = 2 <L_A - L_A*> / n on the first plateau
    lyap = truth.lyapunov[big] / truth.temperature[big, 0] - 1
    assert np.all(np.abs(lyap) < 0.10), lyap
    return err


def test_adamw_two_plateaus(tmp_path):
    truth, ds = _run(tmp_path, kind="adamw")
    assert ds.attrs["optimizer"] == "adamw" and ds.attrs["optimizer_source"] == "state"
    assert str(ds.temperature_estimator.values) == "preconditioned_adam"
    assert str(ds.temperature_refusal.values) == ""
    assert float(ds.momentum_offset_steps) == pytest.approx(momentum_offset_steps("adam", 0.9))
    _check_targets(truth, ds)
    # first law: heat from Adam's own temperature, no SGD work formula
    assert np.isnan(ds.work.values).all()
    t = ds.temperature.values
    both = np.isfinite(t[1:]) & np.isfinite(t[:-1])
    heat = 0.5 * ds.n_params.values * np.diff(t, axis=0)
    np.testing.assert_allclose(ds.heat.values[1:][both], heat[both], rtol=1e-12)
    # the SGD relation T = D / (2 lr) on the same series measures lr, not the noise: about
    # the same number for every layer, while the true temperatures span a factor 6
    order = [list(ds.layer.values).index(n) for n in BIG]
    sgd = np.nanmedian((ds.diffusivity / (2 * ds.effective_learning_rate)).values[-20:], axis=0)
    want = truth.temperature[[truth.layer_names.index(n) for n in BIG], 1]
    assert sgd[order].max() / sgd[order].min() < 1.1 and want.max() / want.min() > 5


def test_heavy_ball_momentum(tmp_path):
    truth, ds = _run(tmp_path, kind="sgd_momentum", momentum=0.9)
    assert str(ds.temperature_estimator.values) == "heavy_ball"
    # eta = lr / (1 - mu): the window's step size is 10x the state's lr
    assert np.nanmax(ds.effective_learning_rate.values) == pytest.approx(1e-2)
    _check_targets(truth, ds)


def test_momentum_offset_closed_forms():
    for beta in (0.5, 0.9, 0.99):
        expect = 2 * beta / ((1 + beta) * (1 - beta))
        assert momentum_offset_steps("adamw", beta) == pytest.approx(expect, rel=1e-9)
        assert momentum_offset_steps("sgd_momentum", beta) == pytest.approx(expect, rel=1e-9)
    assert momentum_offset_steps("sgd", 0.0) == 0.0


@pytest.mark.parametrize(
    ("kw", "estimator"),
    [
        ({"kind": "adamw", "weight_decay": 0.1}, "preconditioned_adam"),
        ({"kind": "adamw", "dtype": "BF16"}, "preconditioned_adam"),
        pytest.param({"kind": "sgd"}, "einstein_sgd", marks=pytest.mark.slow),
        pytest.param({"kind": "nesterov", "momentum": 0.9}, "nesterov", marks=pytest.mark.slow),
    ],
)
def test_optimizer_variants(tmp_path, kw, estimator):
    truth, ds = _run(tmp_path, **kw)
    assert str(ds.temperature_estimator.values) == estimator
    _check_targets(truth, ds)


def test_adam_without_state_reports_d_not_t(tmp_path):
    src = tmp_path / "run"
    simulate_optimizer_series(src, LAYERS, plateaus=((480, 1e-3),))
    for opt in src.glob("checkpoint-*/optimizer.pt"):
        opt.unlink()
    ds = _analyze(src, tmp_path)
    assert ds.attrs["optimizer"] == "unknown"
    assert np.isnan(ds.temperature.values).all()
    assert "without optimizer.pt" in str(ds.temperature_refusal.values)
    assert np.isfinite(ds.diffusivity_per_lr2.values).any()
    # saying it was AdamW does not help: P needs the state
    ds = _analyze(src, tmp_path / "again", {"optimizer": "adamw"})
    assert np.isnan(ds.temperature.values).all()
    assert "exp_avg_sq" in str(ds.temperature_refusal.values)


def test_clipped_sgd_is_refused(tmp_path):
    src = tmp_path / "run"
    simulate_optimizer_series(src, LAYERS, kind="sgd", plateaus=((480, 1e-3),))
    last = sorted(src.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    state = json.loads((last / "trainer_state.json").read_text())
    for entry in state["log_history"]:
        entry["grad_norm"] = 5.0  # logged before clipping, above max_grad_norm = 1
    (last / "trainer_state.json").write_text(json.dumps(state))
    ds = _analyze(src, tmp_path)
    assert float(ds.clip_fraction) == 1.0
    assert "clipped" in str(ds.temperature_refusal.values)
    assert np.isnan(ds.temperature.values).all()
    # work n v^2/lr and heat rest on the same step size: refused with it
    assert np.isnan(ds.work.values).all() and np.isnan(ds.heat.values).all()
    # and no layer state temperature from an energy change never measured (was exactly 0)
    assert np.isnan(ds.layer_state_temperature.values).all()
    shutil.rmtree(tmp_path / "store.zarr")
    ds = _analyze(src, tmp_path, {"max_grad_norm": None})  # no clipping declared
    assert str(ds.temperature_refusal.values) == "" and np.isfinite(ds.temperature.values).any()


def test_sweep_fits_within_optimizer_groups(tmp_path):
    """Two AdamW runs (lr 1e-4, 3e-5) and two SGD runs (lr 1e-3, 3e-4): one power law per
    optimizer (both T ~ lr^1 here), never one across them (which would give k ~ 0.5)."""
    sweep = tmp_path / "sweep"
    for kind, lrs in (("adamw", (1e-4, 3e-5)), ("sgd", (1e-3, 3e-4))):
        for lr in lrs:
            simulate_optimizer_series(
                sweep / f"{kind}-{lr:g}",
                LAYERS,
                kind=kind,
                plateaus=((800, lr),),
                seed=3,
                landscape_lr=lrs[0],
            )
    store = analyze(sweep, tmp_path / "store.zarr", cluster=CLUSTER)
    ds = xr.open_datatree(store, engine="zarr")["sweep"].to_dataset()
    assert list(ds.optimizer_group.values) == ["adamw", "sgd"]
    assert list(ds.run_optimizer.values) == ["adamw", "adamw", "sgd", "sgd"]
    assert list(ds.run_estimator.values) == ["preconditioned_adam"] * 2 + ["einstein_sgd"] * 2
    np.testing.assert_allclose(ds.group_fit_k.values, [1.0, 1.0], atol=0.1)
    assert list(ds.group_fit_k_reason.values) == [0, 0]
    # the headline fit is one group's (ties: the first by name), equal to that group's fit
    assert str(ds.fit_group.values) == "adamw"
    assert float(ds.fit_k) == float(ds.group_fit_k.sel(optimizer_group="adamw"))
    # a fit across both groups would have given a wrong exponent
    from pipeline.estimators.thermodynamics import fit_power_law

    mixed = fit_power_law(ds.run_learning_rate.values, ds.run_temperature.values)[1]
    assert abs(mixed - 1.0) > 0.3
    # the report names each run's optimizer and relation and the per-group fits
    page = html.unescape(render_report(store, tmp_path / "report").read_text())
    assert "adamw (state) → preconditioned_adam" in page and "sgd (state) → einstein_sgd" in page
    assert "within each optimizer group" in page and "Only the adamw runs" in page


def test_unknown_optimizer_setting_is_one_line():
    from pipeline.core.errors import InputError
    from pipeline.settings import thermo_settings

    with pytest.raises(InputError, match="thermo.optimizer must be one of"):
        thermo_settings({"optimizer": "lamb"})
