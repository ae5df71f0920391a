"""A small but realistic thermoscope store for the report tests.

Values come from a simple model, not from expected outputs: each run follows a warmup /
constant / decay learning-rate schedule; layer l sits in a quadratic valley with curvature
a_l, so its temperature tracks T_l(t) = c_l * lr(t) (c_l a per-layer noise scale), its
weight variance relaxes towards T_l / a_l, entropies follow the Gaussian formula at that
variance, and the loss is a decaying drift term plus the thermal loss sum_l T_l / 2.
The tree is written with ``xr.DataTree.from_dict(...).to_zarr(path)`` in the schema of
``docs/INTERNALS.md``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from pipeline.core.reasons import TEMPERATURE_REASONS, reason_attrs

ACTIVATIONS = ("relu", "tanh", "gelu", "identity")
SCALE_FREE = {"relu", "identity"}


def lr_schedule(steps: np.ndarray, peak: float) -> np.ndarray:
    """Linear warmup over the first 20 % of steps, constant to 60 %, linear decay to 10 %."""
    frac = (steps - steps[0]) / max(steps[-1] - steps[0], 1)
    warm = np.clip(frac / 0.2, 0, 1)
    decay = np.clip((frac - 0.6) / 0.4, 0, 1)
    return peak * warm * (1 - 0.9 * decay) + peak * 1e-3 * (frac == 0)


def layer_names(n_layers: int) -> list[str]:
    """Weight / bias pairs of a stack of blocks, in depth order."""
    names = []
    for i in range(n_layers):
        block, kind = divmod(i, 2)
        names.append(f"blocks.{block}.{'weight' if kind == 0 else 'bias'}")
    return names


def _attrs(units: str, long_name: str, estimator: str = "fixture model") -> dict:
    return {"units": units, "long_name": long_name, "estimator": estimator}


def run_dataset(
    rng: np.random.Generator, peak_lr: float, n_steps: int, n_layers: int
) -> xr.Dataset:
    """One run of the model described in the module docstring."""
    steps = np.arange(n_steps, dtype=np.int64) * 50
    lr = lr_schedule(steps.astype(float), peak_lr)
    names = layer_names(n_layers)
    depth = np.arange(n_layers) // 2
    is_vec = np.array([n.endswith("bias") for n in names])
    n_params = np.where(is_vec, 64, 64 * 64).astype(np.int64)
    activation = np.array([ACTIVATIONS[d % len(ACTIVATIONS)] for d in depth])
    curvature = np.exp(rng.uniform(np.log(0.5), np.log(50.0), n_layers))
    noise_scale = np.exp(rng.uniform(np.log(0.2), np.log(2.0), n_layers))
    temp = (
        lr[:, None] * noise_scale[None, :] * (1 + 0.05 * rng.standard_normal((n_steps, n_layers)))
    )
    temp[0] = np.nan  # no displacement before the second checkpoint
    s0 = 0.05
    relax = 1 - np.exp(-np.arange(n_steps)[:, None] / (3 + 2 * depth[None, :]))
    var = s0**2 * (1 - relax) + np.nan_to_num(temp) / curvature * relax + 1e-6
    gauss_h = 0.5 * np.log(2 * np.pi * np.e * var)
    non_gauss = 0.02 * relax * (1 + depth[None, :])
    entropy = gauss_h - non_gauss
    diffusivity = 2 * lr[:, None] * temp
    msd = 2 * diffusivity
    lags = np.arange(1, 4)
    sq = msd[:, :, None] * n_params[None, :, None] * lags[None, None, :]
    for k, lag in enumerate(lags):
        sq[:lag, :, k] = np.nan
    weighted = np.where(np.isfinite(temp), temp * n_params, np.nan)
    global_t = np.nansum(weighted, axis=1) / n_params.sum()
    global_t[0] = np.nan
    spread = np.full(n_steps, np.nan)
    spread[1:] = temp[1:].std(axis=1)
    loss = 2.0 * np.exp(-steps / (steps[-1] / 3 + 1)) + 0.5 * np.nansum(temp, axis=1) + 0.1
    drift = -np.gradient(loss) if n_steps > 1 else np.zeros(n_steps)
    heat = 0.5 * np.nan_to_num(np.gradient(temp, axis=0) if n_steps > 1 else temp)
    work = -np.abs(drift)[:, None] * n_params[None, :] / n_params.sum()
    scale_free = np.array([a in SCALE_FREE for a in activation])
    work_eff = np.where(
        activation == "relu",
        0.5,
        np.where(activation == "identity", 0.0, rng.uniform(0.1, 0.4, n_layers)),
    )
    neighbour = np.concatenate([temp[:, 1:], np.full((n_steps, 1), np.nan)], axis=1)
    carnot = 1 - np.fmin(temp, neighbour) / np.fmax(temp, neighbour)
    total_work = np.abs(work).sum(axis=0)
    realized = total_work / (total_work + np.abs(heat).sum(axis=0))
    work_eff = np.repeat(work_eff[None, :], n_steps, axis=0) * (
        1 + 0.01 * np.sqrt(var / var.mean(0))
    )
    eq_index = np.minimum(int(0.3 * n_steps) + 2 * depth, n_steps)
    eq_step = np.where(eq_index < n_steps, steps[np.minimum(eq_index, n_steps - 1)], np.nan)
    equilibrated = np.arange(n_steps)[:, None] >= eq_index[None, :]
    nonfinite = np.zeros((n_steps, n_layers), dtype=np.int64)
    windows = max(n_steps // 10, 1)
    w_start = steps[(np.arange(windows) * 10).clip(max=n_steps - 1)]
    w_end = steps[(np.arange(windows) * 10 + 9).clip(max=n_steps - 1)]
    sl, s = ("step", "layer"), ("step",)
    coords = {
        "step": ("step", steps),
        "layer": ("layer", np.array(names)),
        "lag": ("lag", lags),
        "window": ("window", np.arange(windows)),
        "n_params": ("layer", n_params),
        "activation": ("layer", activation),
        "is_vector": ("layer", is_vec),
        "depth": ("layer", depth),
        "learning_rate": ("step", lr, _attrs("1", "learning rate", "training log")),
        "loss": ("step", loss, _attrs("loss", "training loss", "training log")),
        "window_start": ("window", w_start),
        "window_end": ("window", w_end),
    }
    data = {
        "weight_mean": (
            sl,
            1e-3 * rng.standard_normal((n_steps, n_layers)),
            _attrs("weight", "mean weight"),
        ),
        "weight_rms": (sl, np.sqrt(var), _attrs("weight", "weight rms")),
        "weight_entropy": (sl, entropy, _attrs("nats/param", "weight-distribution entropy")),
        "gaussian_entropy": (
            sl,
            gauss_h,
            _attrs("nats/param", "Gaussian entropy at same variance"),
        ),
        "non_gaussianity": (sl, non_gauss, _attrs("nats/param", "non-Gaussianity")),
        "nonfinite_count": (sl, nonfinite, _attrs("count", "non-finite values")),
        "sq_distance": (("step", "layer", "lag"), sq, _attrs("weight^2", "squared distance")),
        "msd": (sl, msd, _attrs("weight^2/param", "mean squared displacement")),
        "ensemble_log_var": (
            ("window", "layer"),
            np.log(var[:windows]) * n_params,
            _attrs("ln(weight^2)", "ensemble log variance"),
        ),
        "diffusivity": (sl, diffusivity, _attrs("weight^2/param/step", "diffusivity")),
        "temperature": (sl, temp, _attrs("loss", "layer temperature")),
        "temperature_err": (sl, 0.05 * temp, _attrs("loss", "temperature uncertainty")),
        "temperature_reason": (
            sl,
            np.where(np.isfinite(temp), 0, 2).astype(np.int8),
            _attrs("1", "why the temperature is masked") | reason_attrs(TEMPERATURE_REASONS),
        ),
        "global_temperature": (s, global_t, _attrs("loss", "global temperature")),
        "temperature_spread": (s, spread, _attrs("loss", "temperature spread across layers")),
        "work": (sl, work, _attrs("loss", "work")),
        "heat": (sl, heat, _attrs("loss", "heat")),
        "work_efficiency": (sl, work_eff, _attrs("1", "activation work efficiency")),
        "carnot_efficiency": (sl, carnot, _attrs("1", "Carnot bound")),
        "realized_efficiency": (("layer",), realized, _attrs("1", "realized efficiency")),
        "engine_type": (
            ("layer",),
            np.where(scale_free, "scale-free", "scale-dependent"),
            _attrs("1", "engine type"),
        ),
        "equilibrated": (sl, equilibrated.astype(np.int8), _attrs("1", "equilibrated")),
        "equilibrium_step": (("layer",), eq_step, _attrs("step", "time to equilibrium")),
    }
    log_attrs = {  # a Lightning CSVLogger log, as discovery records it
        "path": "/runs/fixture",
        "log_source": "/runs/fixture/lightning_logs/version_0/metrics.csv",
        "log_loss_key": "train_loss",
        "log_lr_key": "lr-AdamW",
    }
    return xr.Dataset(data, coords=coords, attrs=log_attrs)


def sweep_dataset(runs: dict[str, xr.Dataset], peak_lrs: list[float]) -> xr.Dataset:
    """Sweep node: plateau LR, temperature, U and S per run, power-law fit T = b * lr^k."""
    names = list(runs)
    temps, energies, entropies = [], [], []
    for ds in runs.values():
        plateau = ds.learning_rate >= ds.learning_rate.max() * 0.999
        temps.append(float(ds.global_temperature.where(plateau).mean()))
        energies.append(float(ds.loss.where(plateau).mean()))
        entropies.append(
            float((ds.weight_entropy * ds.n_params).sum("layer").where(plateau).mean())
        )
    lr = np.asarray(peak_lrs, float)
    k, log_b = np.polyfit(np.log(lr), np.log(temps), 1)
    return xr.Dataset(
        {
            "run_learning_rate": ("run", lr, _attrs("1", "plateau learning rate")),
            "run_temperature": (
                "run",
                np.asarray(temps),
                _attrs("loss", "plateau global temperature"),
            ),
            "internal_energy": ("run", np.asarray(energies), _attrs("loss", "plateau loss U")),
            "run_ensemble_entropy": (
                "run",
                np.asarray(entropies),
                _attrs("nats", "total weight entropy S"),
            ),
            "final_loss": (
                "run",
                np.array([float(ds.loss[-1]) for ds in runs.values()]),
                _attrs("loss", "last logged loss"),
            ),
            "fit_b": ((), np.exp(log_b), _attrs("loss", "power-law prefactor b")),
            "fit_k": ((), k, _attrs("1", "power-law exponent k")),
        },
        coords={"run": ("run", np.array(names))},
    )


def build_store(
    path: Path,
    n_runs: int = 2,
    n_layers: int = 6,
    n_steps: int = 30,
    seed: int = 0,
    drop: tuple[str, ...] = (),
    all_nan: tuple[str, ...] = (),
    nonfinite_at: tuple[int, int] | None = None,
    skipped: list[list[str]] | None = None,
) -> Path:
    """Write a store with ``n_runs`` runs (+ a sweep node when n_runs >= 2) to ``path``.

    ``drop`` removes variables from every run, ``all_nan`` fills them with NaN,
    ``nonfinite_at=(step_index, layer_index)`` puts a nonzero nonfinite count there.
    """
    rng = np.random.default_rng(seed)
    peak_lrs = [0.02 * 2**i for i in range(n_runs)]
    runs = {}
    for i, lr in enumerate(peak_lrs):
        with np.errstate(invalid="ignore", divide="ignore"):
            ds = run_dataset(rng, lr, n_steps, n_layers)
        if nonfinite_at is not None and i == 0:
            ds["nonfinite_count"][nonfinite_at] = 7
        runs[f"lr_{lr:g}"] = ds
    nodes: dict[str, xr.Dataset] = {}
    if n_runs >= 2:
        nodes["sweep"] = sweep_dataset(runs, peak_lrs)
    for name, ds in runs.items():
        ds = ds.drop_vars([v for v in drop if v in ds.variables])
        for v in all_nan:
            if v in ds.variables:
                nan = ds[v].astype(float) * np.nan
                ds = ds.assign_coords({v: nan}) if v in ds.coords else ds.assign({v: nan})
        nodes[name] = ds
    root = xr.Dataset(
        attrs={
            "thermoscope_version": "0.1.0",
            "source": "fixture://model",
            "skipped": json.dumps(skipped or []),
        }
    )
    tree = xr.DataTree.from_dict({"/": root, **{f"/{k}": v for k, v in nodes.items()}})
    with warnings.catch_warnings():  # fixed-width unicode in Zarr v3: fine for a fixture
        warnings.simplefilter("ignore")
        tree.to_zarr(path, mode="w")
    return Path(path)
