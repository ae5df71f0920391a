"""Derived thermodynamics of a measured store (stage ``thermo``): no checkpoint I/O.

Each ``add_*`` takes one run's Dataset and returns it with new variables computed by the pure
estimators in ``pipeline.estimators``; ``sweep_dataset`` fits across runs. Formulas, units
and sources: METHODS.md.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.estimators.displacement import (
    diffusivity_from_band,
    temperature_from_diffusivity,
    window_learning_rate,
)
from pipeline.estimators.efficiency import (
    carnot_efficiency,
    engine_type,
    preactivation_scale,
    realized_efficiency,
    work_efficiency,
)
from pipeline.estimators.ensemble import ensemble_entropy
from pipeline.estimators.thermodynamics import (
    closure_error,
    equilibrium,
    first_law_split,
    fit_power_law,
    free_energy_temperature,
    heat_capacity,
    relaxation_rate,
    schedule_diagnostics,
    state_temperature,
)
from pipeline.settings import ThermoSettings, thermo_settings
from pipeline.store.zarr_io import annotate


def _per_layer(ds: xr.Dataset, fn) -> dict[str, np.ndarray]:
    """Apply ``fn(layer_index) -> dict of arrays over step`` to every layer; stack on layer."""
    parts = [fn(j) for j in range(ds.sizes["layer"])]
    return {k: np.stack([p[k] for p in parts], axis=1) for k in parts[0]}


MIN_ROUNDING_RESOLUTION = 0.25  # rms move between checkpoints >= ulp / 2 (see rounding_resolution)


def rounding_resolution(msd: np.ndarray, noise_var: np.ndarray, window: int) -> np.ndarray:
    """(window mean of MSD per interval - 2 q2) / (12 q2): squared move over the mean ulp^2.

    ``msd`` (step, layer) weight^2/param between consecutive checkpoints, ``noise_var`` q2 per
    layer = ulp^2 / 12 of the storage dtype (``rounding_noise_var``). The rounding correction
    of ``diffusivity_from_band`` assumes independent rounding errors at each checkpoint, which
    fails when coordinates move by less than about half an ulp between checkpoints (they stick
    to the same stored value); below MIN_ROUNDING_RESOLUTION the temperature is flagged
    unidentifiable (calibrated on bf16 Langevin series: errors > 10% only below ~0.15).
    Dimensionless; inf for fp64 (q2 = 0), NaN before the window has history.
    """
    out = np.full(msd.shape, np.nan)
    if msd.shape[0] >= window:
        out[window - 1 :] = sliding_window_view(msd, window, axis=0).mean(axis=-1)
    q2 = np.asarray(noise_var, dtype=np.float64)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(
            q2 > 0, (out - 2 * q2) / (12 * q2), np.where(np.isfinite(out), np.inf, np.nan)
        )


def add_temperature(ds: xr.Dataset, window: int) -> xr.Dataset:
    """Diffusivity and local temperature per (step, layer) from the squared-distance band."""
    window = max(1, min(int(window), ds.sizes["lag"]))
    steps = ds.step.values
    band = ds.sq_distance.values
    n_params = ds.n_params.values
    noise = ds.rounding_noise_var.mean("step").values  # weight^2, white noise of the storage dtype
    est = _per_layer(
        ds,
        lambda j: diffusivity_from_band(
            steps, band[:, j, :], int(n_params[j]), window, white_noise_var=float(noise[j])
        ),
    )
    lr = window_learning_rate(steps, ds.log_step.values, ds.log_learning_rate.values, window)
    temp, temp_err = temperature_from_diffusivity(
        est["diffusivity"], est["diffusivity_err"], lr[:, None]
    )
    resolution = rounding_resolution(ds.msd.values, noise, window)
    ident = est["identifiable"] & (resolution >= MIN_ROUNDING_RESOLUTION)
    dims = ("step", "layer")
    return ds.assign(
        diffusivity=(dims, est["diffusivity"]),
        diffusivity_err=(dims, est["diffusivity_err"]),
        temperature_identifiable=(dims, ident.astype(np.int8)),
        rounding_resolution=(dims, resolution),
        drift_speed2=(dims, est["drift_speed2"]),
        window_learning_rate=("step", lr),
        temperature=(dims, temp),
        temperature_err=(dims, temp_err),
    )


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean over the last axis with weights, ignoring NaN (NaN where nothing is finite)."""
    ok = np.isfinite(values)
    w = np.where(ok, weights, 0.0)
    total = w.sum(axis=-1)
    weighted = (np.where(ok, values, 0.0) * w).sum(axis=-1)
    return np.where(total > 0, weighted / np.where(total > 0, total, 1.0), np.nan)


def add_global_temperature(ds: xr.Dataset) -> xr.Dataset:
    """Global T (n-weighted mean over layers) and its spread across layers (equipartition test)."""
    temp = ds.temperature.values
    n = ds.n_params.values.astype(np.float64)
    mean = _weighted_mean(temp, n)
    var = _weighted_mean((temp - mean[:, None]) ** 2, n)
    spread = np.where(mean > 0, np.sqrt(var) / np.where(mean > 0, mean, 1), np.nan)
    return ds.assign(global_temperature=("step", mean), temperature_spread=("step", spread))


def add_ensemble_entropy(ds: xr.Dataset) -> xr.Dataset:
    """Extensive trajectory-ensemble entropy per (window, layer) from the measured log-variances."""
    fluctuating = (
        ds.n_params.values[None, :] - ds.ensemble_frozen.values
    )  # frozen ones carry no entropy term
    ent = ensemble_entropy(ds.ensemble_log_var.values, fluctuating)
    return ds.assign(ensemble_entropy=(("window", "layer"), np.asarray(ent, dtype=np.float64)))


def _checkpoint_energy(ds: xr.Dataset) -> np.ndarray:
    """Loss at each checkpoint step (loss units), NaN where not logged."""
    return ds.loss.values.astype(np.float64)


def add_state_temperature(ds: xr.Dataset, data_shift_step) -> xr.Dataset:
    """Zhang's state temperatures: Type I (init -> t) global and per layer; Type II at a shift."""
    n = ds.n_params.values.astype(np.float64)
    layer_s = ds.weight_entropy.values * n
    total_s = layer_s.sum(axis=1)
    energy = _checkpoint_energy(ds)
    glob = state_temperature(energy[0], energy, total_s[0], total_s)
    layer_de = np.nancumsum(np.nan_to_num(ds.heat.values) - np.nan_to_num(ds.work.values), axis=0)
    local = state_temperature(0.0, layer_de, layer_s[0], layer_s)
    out = ds.assign(
        total_entropy=("step", total_s),
        state_temperature=("step", glob),
        layer_state_temperature=(("step", "layer"), local),
    )
    if data_shift_step is not None:
        before = int(np.searchsorted(ds.step.values, data_shift_step, side="right")) - 1
        if 0 <= before < ds.sizes["step"] - 1:
            shift = state_temperature(energy[before], energy[-1], total_s[before], total_s[-1])
            out = out.assign(shift_state_temperature=((), float(shift)))
    return out


def add_first_law(ds: xr.Dataset) -> xr.Dataset:
    """Work/heat per (interval ending at step, layer) and the closure error against the log."""
    steps = ds.step.values
    lr = ds.window_learning_rate.values  # D and v^2 are window quantities: the window's mean LR
    dt = np.concatenate([[np.nan], np.diff(steps).astype(np.float64)])
    work, heat = first_law_split(
        ds.drift_speed2.values, ds.diffusivity.values, lr, dt, ds.n_params.values
    )
    dloss = np.concatenate([[np.nan], np.diff(_checkpoint_energy(ds))])
    return ds.assign(
        work=(("step", "layer"), work),
        heat=(("step", "layer"), heat),
        closure_error=("step", closure_error(work, heat, dloss)),
    )


def add_efficiency(ds: xr.Dataset) -> xr.Dataset:
    """Heat-engine efficiencies: activation work efficiency, Carnot bound, realized efficiency."""
    acts = [str(a) for a in ds.activation.values]
    scale = preactivation_scale(ds.weight_rms.values, ds.fan_in.values[None, :])
    work_eff = np.full(scale.shape, np.nan)
    for j, act in enumerate(acts):
        if act != "unknown" and not bool(ds.is_vector.values[j]):
            work_eff[:, j] = [
                work_efficiency(act, float(s)) if np.isfinite(s) else np.nan for s in scale[:, j]
            ]
    temp = ds.temperature.values
    neighbour = np.concatenate([temp[:, 1:], np.full((temp.shape[0], 1), np.nan)], axis=1)
    carnot = carnot_efficiency(np.fmin(temp, neighbour), np.fmax(temp, neighbour))
    # over the run: a single interval's drift estimate can be negative (noise-dominated)
    total_work = np.nansum(ds.work.values, axis=0)
    realized = realized_efficiency(
        np.where(total_work > 0, total_work, np.nan), np.nansum(np.abs(ds.heat.values), axis=0)
    )
    types = [engine_type(a) if a != "unknown" else "unknown" for a in acts]
    return ds.assign(
        work_efficiency=(("step", "layer"), work_eff),
        carnot_efficiency=(("step", "layer"), carnot),
        realized_efficiency=("layer", realized),
        engine_type=("layer", types),
    )


def add_equilibrium(ds: xr.Dataset, window: int, rel_tol: float) -> xr.Dataset:
    """Per layer: stationary (rms, entropy, T) while parameters keep moving; onset step.

    The entropy enters as exp(h) (an effective width in weight units): its relative change is
    the absolute change of h in nats, whereas h itself can sit near 0 and its relative change
    depends on the weight units."""
    macro = np.stack(
        [ds.weight_rms.values, np.exp(ds.weight_entropy.values), ds.temperature.values], axis=-1
    )
    flags, onset = [], []
    for j in range(ds.sizes["layer"]):
        eq, start = equilibrium(
            macro[:, j, :], ds.msd.values[:, j], ds.step.values, window, rel_tol
        )
        flags.append(eq)
        onset.append(start)
    return ds.assign(
        equilibrated=(("step", "layer"), np.stack(flags, axis=1).astype(np.int8)),
        equilibrium_step=("layer", np.asarray(onset, dtype=np.float64)),
    )


def derive_run(ds: xr.Dataset, settings: ThermoSettings) -> xr.Dataset:
    """All per-run derived quantities, in dependency order."""
    ds = add_temperature(ds, settings.temperature_window)
    ds = add_global_temperature(ds)
    ds = add_ensemble_entropy(ds)
    ds = add_first_law(ds)
    ds = add_state_temperature(ds, settings.data_shift_step)
    ds = add_efficiency(ds)
    ds = add_equilibrium(ds, settings.equilibrium_window, settings.equilibrium_rel_tol)
    ds = add_relaxation(ds)
    return annotate(ds)


def derive(tree: xr.DataTree, settings: ThermoSettings | dict | None = None) -> xr.DataTree:
    """Measured tree -> tree with derived variables on every run node (+ ``sweep`` node)."""
    settings = thermo_settings(settings)
    nodes = {"/": tree.to_dataset(inherit=False)}
    runs = {
        name: derive_run(child.to_dataset(inherit=False), settings)
        for name, child in tree.children.items()
        if name != "sweep"
    }
    nodes.update({f"/{name}": ds for name, ds in runs.items()})
    if len(runs) >= 2:
        nodes["/sweep"] = sweep_dataset(runs)
    return xr.DataTree.from_dict(nodes)


def _second_half(values: np.ndarray) -> np.ndarray:
    half = values[len(values) // 2 :]
    return half[np.isfinite(half)]


def _second_half_windows(ds: xr.Dataset) -> np.ndarray:
    """Ensemble entropy (summed over layers) of the windows starting in the run's second half
    (the last window when none does): windows of one stationary plateau, averaged for S."""
    ens = ds.ensemble_entropy.sum("layer", skipna=False).values
    if ens.size == 0:
        return ens
    late = ds.window_start.values >= ds.step.values[len(ds.step) // 2]
    picked = ens[late] if late.any() else ens[-1:]
    return picked[np.isfinite(picked)]


def _plateau(ds: xr.Dataset) -> dict:
    """Per-run plateau summary: LR, temperature, U, S, final loss over the second half."""
    lr = _second_half(ds.window_learning_rate.values)
    temp = _second_half(ds.global_temperature.values)
    loss = _second_half(ds.loss.values)
    ens = _second_half_windows(ds)
    logged = ds.log_loss.values[np.isfinite(ds.log_loss.values)]
    return {
        "run_learning_rate": np.median(lr) if lr.size else np.nan,
        "constant_lr": int(lr.size > 0 and lr.max() <= 1.05 * lr.min()),
        "run_temperature": np.median(temp) if temp.size else np.nan,
        "internal_energy": loss.mean() if loss.size else np.nan,
        "run_ensemble_entropy": ens.mean() if ens.size else np.nan,
        "final_loss": logged[-1] if logged.size else np.nan,
    }


def _logged_lr(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(steps, lr) of the run's LR log without missing entries (NaN if nothing is logged)."""
    lr = ds.log_learning_rate.values.astype(np.float64)
    ok = np.isfinite(lr)
    if not ok.any():
        return np.array([0.0, 1.0]), np.array([np.nan, np.nan])
    return ds.log_step.values[ok].astype(np.float64), lr[ok]


def sweep_dataset(runs: dict[str, xr.Dataset]) -> xr.Dataset:
    """Cross-run fits: T vs LR power law, free-energy temperature, heat capacity, schedules."""
    names = sorted(runs)
    rows = [_plateau(runs[n]) for n in names]
    cols = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}
    plateau = cols["constant_lr"] > 0
    b, k, k_err = fit_power_law(
        cols["run_learning_rate"][plateau], cols["run_temperature"][plateau]
    )
    fe = [np.full(len(names), np.nan) for _ in range(3)]
    if plateau.sum() >= 2:
        est = free_energy_temperature(
            cols["internal_energy"][plateau], cols["run_ensemble_entropy"][plateau]
        )
        for target, value in zip(fe, est):
            target[plateau] = value
    t_mid, capacity = heat_capacity(
        cols["internal_energy"][plateau], cols["run_temperature"][plateau]
    )
    logs = [_logged_lr(runs[n]) for n in names]
    sched = schedule_diagnostics([lr for _, lr in logs], cols["final_loss"], [s for s, _ in logs])
    ds = xr.Dataset(
        {key: ("run", value) for key, value in cols.items()}
        | {
            "free_energy_temperature": ("run", fe[0]),
            "free_energy_temperature_lower": ("run", fe[1]),
            "free_energy_temperature_upper": ("run", fe[2]),
            "min_lr": ("run", sched["min_lr"]),
            "lr_sum": ("run", sched["lr_sum"]),
            "predicted_final_loss": ("run", sched["predicted"]),
            "heat_capacity": ("pair", capacity),
            "fit_b": ((), b),
            "fit_k": ((), k),
            "fit_k_err": ((), k_err),
        },
        coords={"run": names, "pair_temperature": ("pair", t_mid)},
    )
    ds["constant_lr"] = ds.constant_lr.astype(np.int8)
    return annotate(ds)


def lr_change_steps(
    log_step: np.ndarray, log_lr: np.ndarray, jump: float = 0.2, flat: int = 3
) -> list[int]:
    """Steps where the LR jumps by more than ``jump`` (relative) between two flat plateaus."""
    lr = np.asarray(log_lr, dtype=np.float64)
    out = []
    for k in range(flat, len(lr) - flat + 1):
        before, after = lr[k - flat : k], lr[k : k + flat]
        if (
            np.ptp(before) <= 0.01 * before.max()
            and np.ptp(after) <= 0.01 * after.max()
            and abs(after[0] - before[-1]) > jump * before[-1]
        ):
            out.append(int(log_step[k]))
    return out


def add_relaxation(ds: xr.Dataset) -> xr.Dataset:
    """Loss relaxation rate after each LR jump between plateaus (thermal conduction)."""
    changes = lr_change_steps(ds.log_step.values, ds.log_learning_rate.values)
    fits = [relaxation_rate(ds.log_step.values, ds.log_loss.values, c) for c in changes]
    rate = np.array([f[0] for f in fits], dtype=np.float64)
    err = np.array([f[1] for f in fits], dtype=np.float64)
    return ds.assign(
        relaxation_rate=("lr_change", rate), relaxation_rate_err=("lr_change", err)
    ).assign_coords(lr_change_step=("lr_change", np.asarray(changes, dtype=np.int64)))
