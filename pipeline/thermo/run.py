"""Per-run derived thermodynamics (stage thermo): no checkpoint I/O.

Each ``add_*`` takes one run's Dataset and returns it with new variables computed by the pure
estimators in ``pipeline.estimators``; ``derive_run`` applies them in dependency order.
Formulas, units and sources: METHODS.md.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from pipeline.core.reasons import EfficiencyReason, StateTemperatureReason
from pipeline.estimators.efficiency import (
    carnot_efficiency,
    engine_type,
    preactivation_scale,
    realized_efficiency,
    released_heat,
    work_efficiency,
)
from pipeline.estimators.ensemble import ensemble_entropy
from pipeline.estimators.thermodynamics import (
    closure_error,
    equilibrium,
    first_law_split,
    relaxation_rate,
    state_temperature,
)
from pipeline.ingest.architecture import NO_ACTIVATION, signal_partners
from pipeline.settings import ThermoSettings
from pipeline.store.zarr_io import annotate
from pipeline.thermo.temperature import add_global_temperature, add_temperature


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


def refuse_state_temperature(value, energy_change) -> tuple[np.ndarray, np.ndarray]:
    """Zhang's dE/dS (loss/nat) as a temperature only where it is one: NaN and a
    ``StateTemperatureReason`` where the energy change is unmeasured (1), the entropy change
    unresolved (2), or dE/dS <= 0 (3: energy and entropy moved in opposite directions, or the
    energy did not move; no thermal reading, and never a negative temperature). METHODS.md
    quantity 4."""
    value = np.asarray(value, dtype=np.float64)
    reason = np.full(value.shape, StateTemperatureReason.OK, dtype=np.int8)
    reason[~np.isfinite(value)] = StateTemperatureReason.NO_ENTROPY_CHANGE
    reason[~np.isfinite(energy_change)] = StateTemperatureReason.NO_ENERGY_CHANGE
    reason[np.isfinite(value) & ~(value > 0)] = StateTemperatureReason.NOT_POSITIVE
    return np.where(reason == StateTemperatureReason.OK, value, np.nan), reason


def add_state_temperature(ds: xr.Dataset, data_shift_step) -> xr.Dataset:
    """Zhang's state temperatures: Type I (init -> t) global and per layer; Type II at a shift;
    each refused (NaN + ``*_reason``) where dE/dS is no positive temperature."""
    n = ds.n_params.values.astype(np.float64)
    layer_s = ds.weight_entropy.values * n
    total_s = layer_s.sum(axis=1)
    energy = _checkpoint_energy(ds)
    glob, glob_reason = refuse_state_temperature(
        state_temperature(energy[0], energy, total_s[0], total_s), energy - energy[0]
    )
    layer_de = np.nancumsum(np.nan_to_num(ds.heat.values) - np.nan_to_num(ds.work.values), axis=0)
    # a layer with no finite work or heat yet has no measured energy change: refused, not T = 0
    known = np.cumsum(np.isfinite(ds.heat.values) | np.isfinite(ds.work.values), axis=0) > 0
    layer_de = np.where(known, layer_de, np.nan)
    local, local_reason = refuse_state_temperature(
        state_temperature(0.0, layer_de, layer_s[0], layer_s), layer_de
    )
    out = ds.assign(
        total_entropy=("step", total_s),
        state_temperature=("step", glob),
        state_temperature_reason=("step", glob_reason),
        layer_state_temperature=(("step", "layer"), local),
        layer_state_temperature_reason=(("step", "layer"), local_reason),
    )
    if data_shift_step is not None:
        before = int(np.searchsorted(ds.step.values, data_shift_step, side="right")) - 1
        if 0 <= before < ds.sizes["step"] - 1:
            shift, shift_reason = refuse_state_temperature(
                state_temperature(energy[before], energy[-1], total_s[before], total_s[-1]),
                energy[-1] - energy[before],
            )
            out = out.assign(
                shift_state_temperature=((), float(shift)),
                shift_state_temperature_reason=((), shift_reason),
            )
    return out


def add_first_law(ds: xr.Dataset) -> xr.Dataset:
    """Work/heat per (interval ending at step, layer) and the closure error against the log."""
    steps = ds.step.values
    lr = ds.window_learning_rate.values  # D and v^2 are window quantities: the window's mean LR
    dt = np.concatenate([[np.nan], np.diff(steps).astype(np.float64)])
    work, heat = first_law_split(
        ds.drift_speed2.values, ds.diffusivity.values, lr, dt, ds.n_params.values
    )
    estimator = str(ds.temperature_estimator.values) if "temperature_estimator" in ds else ""
    if estimator not in ("", "einstein_sgd"):
        # the split above is plain SGD's (work n v^2/lr, T = D/(2 lr)); for another optimizer
        # the heat follows its own temperature (equipartition), the work has no formula here
        heat = np.full(heat.shape, np.nan)
        heat[1:] = 0.5 * ds.n_params.values * np.diff(ds.temperature.values, axis=0)
        work = np.full(work.shape, np.nan)
    if "temperature_refusal" in ds and str(ds.temperature_refusal.values):
        # the relation refused the step size (e.g. clipped SGD: the step is not lr there), and
        # both work n v^2/lr and heat rest on it: refused too (the refusal says why)
        work, heat = np.full(work.shape, np.nan), np.full(heat.shape, np.nan)
    dloss = np.concatenate([[np.nan], np.diff(_checkpoint_energy(ds))])
    return ds.assign(
        work=(("step", "layer"), work),
        heat=(("step", "layer"), heat),
        closure_error=("step", closure_error(work, heat, dloss)),
    )


def _work_efficiency(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Activation work efficiency per (step, layer) for tensors that feed an activation, and
    the per-layer reason (1-D tensor, no activation, activation unknown) where they do not."""
    acts = [str(a) for a in ds.activation.values]
    scale = preactivation_scale(ds.weight_rms.values, ds.fan_in.values[None, :])
    values = np.full(scale.shape, np.nan)
    reason = np.full(len(acts), EfficiencyReason.OK, dtype=np.int8)
    for j, act in enumerate(acts):
        if bool(ds.is_vector.values[j]):
            reason[j] = EfficiencyReason.VECTOR
        elif act == NO_ACTIVATION:
            reason[j] = EfficiencyReason.NO_ACTIVATION
        elif act == "unknown":
            reason[j] = EfficiencyReason.ACTIVATION_UNKNOWN
        else:
            values[:, j] = [work_efficiency(act, float(s)) for s in scale[:, j]]
    return values, reason


def _carnot(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Carnot bound 1 - T_cold/T_hot between each 2-D layer and the next one in signal order
    (``architecture.signal_partners``), only where both temperatures are identified."""
    temp = ds.temperature.values
    partners = signal_partners([str(n) for n in ds.layer.values], ds.is_vector.values)
    values = np.full(temp.shape, np.nan)
    reason = np.full(temp.shape, EfficiencyReason.NO_PARTNER, dtype=np.int8)
    for j, p in enumerate(partners):
        if bool(ds.is_vector.values[j]):
            reason[:, j] = EfficiencyReason.VECTOR
        elif p >= 0:
            pair = temp[:, [j, p]]
            values[:, j] = carnot_efficiency(pair.min(axis=1), pair.max(axis=1))
            ok = np.isfinite(values[:, j])
            reason[:, j] = np.where(ok, EfficiencyReason.OK, EfficiencyReason.NO_TEMPERATURE)
    return values, reason


def _realized(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Realized efficiency W / (W + Q) per layer between its first and last identified T:
    W the summed first-law work of those intervals, Q the heat released (``released_heat``,
    equipartition). Refused (NO_TEMPERATURE) without two identified steps, (NO_HEAT) unless
    W > 0 and Q >= 0 (an engine that absorbs heat from the layer's cooling)."""
    temp, work, n = ds.temperature.values, ds.work.values, ds.n_params.values
    values = np.full(temp.shape[1], np.nan)
    reason = np.full(temp.shape[1], EfficiencyReason.NO_TEMPERATURE, dtype=np.int8)
    for j in range(temp.shape[1]):
        have = np.flatnonzero(np.isfinite(temp[:, j]))
        if have.size < 2:
            continue
        first, last = have[0], have[-1]
        w = np.nansum(work[first + 1 : last + 1, j])
        q = released_heat(temp[first, j], temp[last, j], n[j])
        if w > 0 and q >= 0:
            values[j] = realized_efficiency(w, q)
            reason[j] = EfficiencyReason.OK
        else:
            reason[j] = EfficiencyReason.NO_HEAT
    return values, reason


def add_efficiency(ds: xr.Dataset) -> xr.Dataset:
    """Heat-engine efficiencies with their reason codes: the activation's work efficiency
    (tensors that feed an activation), the Carnot bound (signal-order neighbours, both T
    identified) and the realized efficiency (work over work + released heat)."""
    work_eff, work_reason = _work_efficiency(ds)
    carnot, carnot_reason = _carnot(ds)
    realized, realized_reason = _realized(ds)
    acts = [str(a) for a in ds.activation.values]
    types = [engine_type(a) if a not in ("unknown", NO_ACTIVATION) else a for a in acts]
    return ds.assign(
        work_efficiency=(("step", "layer"), work_eff),
        work_efficiency_reason=("layer", work_reason),
        carnot_efficiency=(("step", "layer"), carnot),
        carnot_efficiency_reason=(("step", "layer"), carnot_reason),
        realized_efficiency=("layer", realized),
        realized_efficiency_reason=("layer", realized_reason),
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
    ds = add_temperature(
        ds,
        settings.temperature_window,
        settings.optimizer,
        settings.max_grad_norm,
        settings.temperature_min_window,
        settings.rounding_correction,
    )
    ds = add_global_temperature(ds)
    ds = add_ensemble_entropy(ds)
    ds = add_first_law(ds)
    ds = add_state_temperature(ds, settings.data_shift_step)
    ds = add_efficiency(ds)
    ds = add_equilibrium(ds, settings.equilibrium_window, settings.equilibrium_rel_tol)
    ds = add_relaxation(ds)
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
