"""Every variable the store can hold: units, long name and the estimator that makes it.

One literal table, read by ``annotate`` on every write: a variable missing here cannot be
stored. Units of weights are the checkpoint's own ("weight"); temperatures are in loss units
(METHODS.md, "Conventions"). The estimator names a function in ``pipeline.estimators`` (or the
stage step that forms the value) so a reader of the store can find the formula.
"""

from __future__ import annotations

# name -> (units, long_name, estimator)
VARIABLES: dict[str, tuple[str, str, str]] = {
    # measured (stage measure): streamed from the checkpoints
    "weight_mean": ("weight", "mean of the layer's values", "moments"),
    "weight_rms": ("weight", "root mean square of the layer's values", "moments"),
    "weight_entropy": (
        "nats/param",
        "differential entropy of the value distribution",
        "entropy.differential_entropy",
    ),
    "gaussian_entropy": (
        "nats/param",
        "entropy of a Gaussian with the same variance",
        "entropy.gaussian_entropy",
    ),
    "non_gaussianity": ("nats/param", "Gaussian entropy minus value entropy (>= 0)", "entropy"),
    "nonfinite_count": ("count", "NaN or Inf values in the layer", "moments"),
    "rounding_noise_var": (
        "weight^2",
        "variance per value of the storage dtype's rounding (ulp^2/12)",
        "displacement.rounding_noise_var",
    ),
    "on_bf16_grid": (
        "1",
        "1 when every sampled value is exactly representable in bfloat16",
        "displacement.on_bf16_grid",
    ),
    "bf16_noise_var": (
        "weight^2",
        "variance per value of bfloat16 rounding of the values (ulp^2/12)",
        "displacement.rounding_noise_var",
    ),
    "sq_distance": (
        "weight^2",
        "squared distance to the checkpoint lag steps back, summed over the layer",
        "displacement.sq_distance_band",
    ),
    "sq_distance_precond": (
        "loss*weight",
        "preconditioned squared distance sum_i P_i dtheta_i^2 to the checkpoint lag steps back "
        "(Adam P = sqrt(v_hat) + eps of the later checkpoint)",
        "kernel.PrecondBand",
    ),
    "precond_mean": (
        "loss/weight",
        "layer mean of Adam's preconditioner P = sqrt(v_hat) + eps at the checkpoint",
        "kernel.PrecondBand",
    ),
    "optimizer_lr": (
        "weight^2/loss",
        "learning rate in the optimizer state saved with the checkpoint (its param group)",
        "optimizer_state.group_hyperparameters",
    ),
    "optimizer_momentum": (
        "1",
        "momentum in the optimizer state (Adam beta1 or SGD momentum)",
        "optimizer_state.group_hyperparameters",
    ),
    "msd": (
        "weight^2/param",
        "mean squared displacement since the previous checkpoint",
        "displacement",
    ),
    "ensemble_log_var": (
        "ln(weight^2)",
        "sum over coordinates of ln Var of detrended values in the window",
        "ensemble.window_log_var_sum",
    ),
    "ensemble_frozen": (
        "count",
        "coordinates left out of ensemble_log_var as frozen (no resolvable fluctuation)",
        "ensemble.window_statistics",
    ),
    "spectral_entropy": (
        "1",
        "spectral entropy normalised by ln(rank) (WeightWatcher)",
        "spectral.spectral_metrics",
    ),
    "stable_rank": (
        "1",
        "stable rank sum(s^2)/max(s^2) (WeightWatcher)",
        "spectral.spectral_metrics",
    ),
    "log_loss": ("loss", "training loss from the run's log", "log"),
    "log_learning_rate": ("weight^2/loss", "learning rate from the run's log", "log"),
    # derived (stage thermo): from the measured arrays, no checkpoint I/O
    "diffusivity": (
        "weight^2/param/step",
        "noise diffusivity D (MSD-vs-lag, drift removed)",
        "displacement.diffusivity_from_band",
    ),
    "diffusivity_err": (
        "weight^2/param/step",
        "1-sigma uncertainty of the diffusivity",
        "displacement.diffusivity_from_band",
    ),
    "temperature_reason": (
        "1",
        "why the local temperature is masked (0: identified; code table in attrs)",
        "thermo.temperature.add_temperature",
    ),
    "drift_speed2": (
        "weight^2/param/step^2",
        "squared drift (river) speed per parameter",
        "displacement.diffusivity_from_band",
    ),
    "diffusivity_precond": (
        "loss*weight/param/step",
        "preconditioned diffusivity D_P (Adam: slope of sum_i P_i dtheta_i^2 per parameter)",
        "displacement.diffusivity_from_band",
    ),
    "diffusivity_per_lr2": (
        "weight^2/param/step/lr^2",
        "D / eta^2: the optimizer-free reading when no temperature can be formed",
        "thermo.add_temperature",
    ),
    "effective_learning_rate": (
        "weight^2/loss",
        "step size eta of the temperature relation (Adam: lr; heavy ball: lr/(1-mu)), window mean",
        "preconditioned.effective_step",
    ),
    "temperature_estimator": (
        "1",
        "relation that produced the run's temperature (einstein_sgd, heavy_ball, nesterov, "
        "preconditioned_adam, none)",
        "relation.temperature_relation",
    ),
    "temperature_refusal": (
        "1",
        "why the run has no loss-unit temperature ('' when it has one)",
        "relation.temperature_relation",
    ),
    "momentum_offset_steps": (
        "step",
        "steps' worth by which momentum shortens the squared displacement (fixed by beta)",
        "preconditioned.momentum_offset_steps",
    ),
    "clip_fraction": (
        "1",
        "fraction of logged gradient norms above thermo.max_grad_norm (clipped steps)",
        "optimizer_state.clip_fraction",
    ),
    "window_learning_rate": (
        "weight^2/loss",
        "mean learning rate over the temperature window",
        "displacement.window_learning_rate",
    ),
    "rounding_resolution": (
        "1",
        "displacement variance between checkpoints over the storage dtype's ulp^2 "
        "(window mean; < 0.25: unresolved)",
        "thermo.temperature.window_rounding_resolution",
    ),
    "temperature": (
        "loss",
        "local temperature T = D_P / (2 eta) (SGD: D / (2 lr))",
        "displacement.temperature_from_diffusivity",
    ),
    "temperature_err": (
        "loss",
        "1-sigma uncertainty of the local temperature",
        "displacement.temperature_from_diffusivity",
    ),
    "global_temperature": (
        "loss",
        "n_params-weighted mean of layer temperatures",
        "thermo.add_global_temperature",
    ),
    "global_temperature_coverage": (
        "1",
        "fraction of the parameters in layers with an identified temperature",
        "thermo.temperature.add_global_temperature",
    ),
    "temperature_spread": (
        "1",
        "n_params-weighted coefficient of variation of T across layers (0 at equipartition)",
        "thermo.add_global_temperature",
    ),
    "ensemble_entropy": (
        "nats",
        "trajectory ensemble entropy of the window (diagonal Gaussian, extensive)",
        "ensemble.ensemble_entropy",
    ),
    "total_entropy": (
        "nats",
        "sum over layers of n_params x weight entropy (extensive)",
        "entropy.differential_entropy",
    ),
    "state_temperature": (
        "loss",
        "Type I state temperature dE/dS from initialization to this step (global; NaN where "
        "dE/dS <= 0)",
        "thermodynamics.state_temperature",
    ),
    "layer_state_temperature": (
        "loss",
        "Type I state temperature of the layer: its share of dE over its dS",
        "thermodynamics.state_temperature",
    ),
    "shift_state_temperature": (
        "loss",
        "Type II state temperature across the marked data shift",
        "thermodynamics.state_temperature",
    ),
    "state_temperature_reason": (
        "1",
        "why the global state temperature is refused (0: computed; table in attrs)",
        "thermo.run.add_state_temperature",
    ),
    "layer_state_temperature_reason": (
        "1",
        "why the layer state temperature is refused (0: computed; table in attrs)",
        "thermo.run.add_state_temperature",
    ),
    "shift_state_temperature_reason": (
        "1",
        "why the Type II state temperature is refused (0: computed; table in attrs)",
        "thermo.run.add_state_temperature",
    ),
    "work": (
        "loss",
        "work: loss removed by the drift (river) over the interval to this step",
        "thermodynamics.first_law_split",
    ),
    "heat": (
        "loss",
        "net heat absorbed by valley directions over the interval to this step",
        "thermodynamics.first_law_split",
    ),
    "closure_error": (
        "loss",
        "logged loss change minus sum over layers of (heat - work)",
        "thermodynamics.closure_error",
    ),
    "work_efficiency": (
        "1",
        "activation work efficiency 1 - E[phi(z)^2]/E[z^2] at the layer's pre-activation scale",
        "efficiency.work_efficiency",
    ),
    "carnot_efficiency": (
        "1",
        "Carnot bound 1 - T_cold/T_hot between the layer and the next one in signal order",
        "efficiency.carnot_efficiency",
    ),
    "realized_efficiency": (
        "1",
        "realized efficiency W / (W + Q) between the layer's first and last identified T: "
        "W the first-law work, Q the heat released by cooling (n/2)(T_first - T_last)",
        "efficiency.realized_efficiency",
    ),
    "work_efficiency_reason": (
        "1",
        "why the layer has no activation work efficiency (0: computed; table in attrs)",
        "thermo.run._work_efficiency",
    ),
    "carnot_efficiency_reason": (
        "1",
        "why the Carnot bound is masked (0: computed; table in attrs)",
        "thermo.run._carnot",
    ),
    "realized_efficiency_reason": (
        "1",
        "why the realized efficiency is refused (0: computed; table in attrs)",
        "thermo.run._realized",
    ),
    "engine_type": (
        "1",
        "scale-free (homogeneous activation) or scale-dependent engine",
        "efficiency.engine_type",
    ),
    "equilibrated": (
        "1",
        "macroscopic state stationary while parameters move (1) or not (0)",
        "thermodynamics.equilibrium",
    ),
    "equilibrium_step": (
        "step",
        "onset of the final equilibrated stretch (NaN: not equilibrated)",
        "thermodynamics.equilibrium",
    ),
    "run_learning_rate": (
        "weight^2/loss",
        "median step size eta over the run's second half (plateau; SGD: the learning rate)",
        "thermo.sweep_dataset",
    ),
    "constant_lr": (
        "1",
        "the run's learning rate is constant over its second half (1) or not (0)",
        "thermo.sweep_dataset",
    ),
    "run_temperature": (
        "loss",
        "median global temperature over the run's second half",
        "thermo.sweep_dataset",
    ),
    "internal_energy": (
        "loss",
        "mean logged loss over the run's second half (U)",
        "thermo.sweep_dataset",
    ),
    "run_ensemble_entropy": (
        "nats",
        "mean ensemble entropy of the windows in the run's second half, summed over layers (S)",
        "ensemble.ensemble_entropy",
    ),
    "free_energy_temperature": (
        "loss",
        "T making each plateau a minimum of F = U - T S (NaN: above the hull)",
        "thermodynamics.free_energy_temperature",
    ),
    "free_energy_temperature_lower": (
        "loss",
        "lower bound of the free-energy temperature",
        "thermodynamics.free_energy_temperature",
    ),
    "free_energy_temperature_upper": (
        "loss",
        "upper bound of the free-energy temperature",
        "thermodynamics.free_energy_temperature",
    ),
    "fit_b": (
        "loss",
        "power-law prefactor b of T = b lr^k (lr in its log units)",
        "thermodynamics.fit_power_law",
    ),
    "fit_k": ("1", "power-law exponent k of T = b lr^k", "thermodynamics.fit_power_law"),
    "fit_group": (
        "1",
        "optimizer group the sweep fit, free-energy T and heat capacity use (most runs with T)",
        "thermo.sweep_dataset",
    ),
    "group_fit_b": (
        "loss",
        "power-law prefactor b of T = b lr^k within one optimizer group",
        "thermodynamics.fit_power_law",
    ),
    "group_fit_k": (
        "1",
        "power-law exponent k of T = b lr^k within one optimizer group",
        "thermodynamics.fit_power_law",
    ),
    "group_fit_k_err": (
        "1",
        "1-sigma uncertainty of group_fit_k",
        "thermodynamics.fit_power_law",
    ),
    "fit_k_err": ("1", "1-sigma uncertainty of k", "thermodynamics.fit_power_law"),
    "loss_trend": (
        "1",
        "|loss trend| over the run's second half / mean loss (stationarity test)",
        "thermo.sweep.relative_trend",
    ),
    "temperature_trend": (
        "1",
        "|global T trend| over the run's second half / mean T (stationarity test)",
        "thermo.sweep.relative_trend",
    ),
    "plateau_reason": (
        "1",
        "0: a stationary constant-LR plateau used by the sweep fits; else why not",
        "thermo.sweep._plateau",
    ),
    "free_energy_temperature_reason": (
        "1",
        "why the free-energy temperature is refused (0: accepted; table in attrs)",
        "thermo.sweep._free_energy",
    ),
    "heat_capacity_reason": (
        "1",
        "why the heat capacity is refused (0: accepted; table in attrs)",
        "thermo.sweep._heat_capacity",
    ),
    "fit_k_reason": (
        "1",
        "why the power-law fit is refused (0: accepted; table in attrs)",
        "thermo.sweep._power_law",
    ),
    "group_fit_k_reason": (
        "1",
        "why the power-law fit within one optimizer group is refused (0: accepted; table in attrs)",
        "thermo.sweep._power_law",
    ),
    "lr_proportional": (
        "1",
        "T proportional to lr: 1 |k-1| <= tolerance, 0 rejected beyond 2 k_err, -1 undecided",
        "thermo.sweep._power_law",
    ),
    "heat_capacity": (
        "1",
        "C = dU/dT between runs adjacent in temperature (loss/loss)",
        "thermodynamics.heat_capacity",
    ),
    "final_loss": ("loss", "last logged loss of the run", "thermo.sweep_dataset"),
    "min_lr": (
        "weight^2/loss",
        "minimum logged learning rate",
        "thermodynamics.schedule_diagnostics",
    ),
    "lr_sum": (
        "weight^2/loss",
        "sum of the learning rate over training steps",
        "thermodynamics.schedule_diagnostics",
    ),
    "predicted_final_loss": (
        "loss",
        "a + b min_lr + c / lr_sum fitted across runs",
        "thermodynamics.schedule_diagnostics",
    ),
    "relaxation_rate": (
        "1/step",
        "rate of the loss relaxation after an LR change (Liu: ~ 2 lr a)",
        "thermodynamics.relaxation_rate",
    ),
    "relaxation_rate_err": (
        "1/step",
        "1-sigma uncertainty of the relaxation rate",
        "thermodynamics.relaxation_rate",
    ),
}
