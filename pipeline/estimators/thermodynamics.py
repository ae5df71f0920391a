"""Derived thermodynamic quantities from already-measured per-step / per-layer values
(METHODS.md quantities 4, 5, 6, 7, 9). Pure numpy functions: arrays in, numbers out.

Conventions (METHODS.md, Conventions): temperature T in loss units (equipartition: each
valley direction carries T/2 of excess loss; for theta -= lr (grad + noise),
T = lr sigma^2 / 2), diffusivity D = one-step mean squared displacement of the noise part per
parameter (weight^2 / param / step), D = 2 lr T; entropies in nats; steps are optimizer steps.
Sources: Zhang 2024; Liu, Liu, Gore & Tegmark 2025; Sadrtdinov et al. 2025; the blog essay.
Readings and derivations: METHODS.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.optimize import curve_fit


def _ratio(num, den, min_abs: float = 0.0) -> np.ndarray:
    """num / den elementwise, NaN where |den| <= min_abs or either is non-finite."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(den) > min_abs, num / den, np.nan)


def _along_steps(x, ndim: int) -> np.ndarray:
    """A per-step array (n_steps,) reshaped to broadcast against (n_steps, ...) of ``ndim``."""
    x = np.asarray(x, dtype=float)
    return x.reshape(x.shape + (1,) * (ndim - x.ndim)) if x.ndim == 1 else x


# ---------------------------------------------------------------- temperatures (4, 5)


def state_temperature(energy_a, energy_b, entropy_a, entropy_b, min_abs_ds: float = 1e-9):
    """Zhang's state temperature T = (E_b - E_a) / (S_b - S_a) between two states.

    Type I: a = initialization, b = checkpoint t; Type II: a/b = before/after a data shift.
    E in loss units (e.g. logged loss), S in nats (the summed weight-distribution entropy),
    T in loss/nat. Vectorised (broadcasts over steps/layers); the sign is kept (a negative T
    means energy and entropy moved in opposite directions); NaN where |dS| <= min_abs_ds.
    Source: Zhang 2024; METHODS.md quantity 4.
    """
    return _ratio(np.subtract(energy_b, energy_a), np.subtract(entropy_b, entropy_a), min_abs_ds)


def log_mean(t1, t2):
    """Logarithmic mean (t1 - t2) / ln(t1 / t2) (= t1 when equal; NaN unless both > 0).

    For a quadratic valley, dU/dS between stationary states at temperatures t1, t2 equals
    log_mean(t1, t2) exactly (METHODS.md quantity 5b). Units: those of t1, t2.
    """
    t1, t2 = np.broadcast_arrays(np.asarray(t1, dtype=float), np.asarray(t2, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (t1 - t2) / np.log1p((t1 - t2) / t2)
    out = np.where(t1 == t2, t1, out)
    return np.where((t1 > 0) & (t2 > 0), out, np.nan)[()]


class FreeEnergyTemperature(NamedTuple):
    estimate: np.ndarray  # per point, loss/nat; NaN where the bounds are inconsistent
    lower: np.ndarray  # max chord slope to points of smaller S (NaN if none)
    upper: np.ndarray  # min chord slope to points of larger S (NaN if none)


def free_energy_temperature(U, S, min_abs_ds: float = 1e-12) -> FreeEnergyTemperature:
    """Temperature at which each stationary point (plateau or run) minimises F = U - T S.

    U: mean training loss of each stationary point (loss units); S: its entropy (nats, e.g.
    ``ensemble_entropy``). Point i is the minimiser of F among all points at its own T_i
    iff U_i - T_i S_i <= U_j - T_i S_j for all j, i.e.
        max_{S_j < S_i} (U_i - U_j)/(S_i - S_j)  <=  T_i
                                                 <=  min_{S_j > S_i} (U_j - U_i)/(S_j - S_i).
    For points on the lower convex hull of U(S) these are the chords dU/dS to the sorted
    neighbours. Estimate: geometric mean of the two bounds when both are positive (midpoint
    otherwise), the single bound at the ends, NaN where lower > upper (the point lies above
    the hull: no T makes it a free-energy minimum). Arrays are returned in input order.
    Source: Sadrtdinov et al. 2025; METHODS.md quantity 5b.
    """
    U, S = np.asarray(U, dtype=float), np.asarray(S, dtype=float)
    dS = S[None, :] - S[:, None]  # [i, j] = S_j - S_i
    slope = _ratio(U[None, :] - U[:, None], dS, min_abs_ds)
    ok = np.isfinite(slope)
    upper = np.where(ok & (dS > 0), slope, np.inf).min(axis=1)
    lower = np.where(ok & (dS < 0), slope, -np.inf).max(axis=1)
    lower, upper = (np.where(np.isfinite(b), b, np.nan) for b in (lower, upper))
    both = np.isfinite(lower) & np.isfinite(upper)
    with np.errstate(invalid="ignore"):
        mid = np.where((lower > 0) & (upper > 0), np.sqrt(lower * upper), 0.5 * (lower + upper))
    estimate = np.where(both, np.where(lower <= upper, mid, np.nan), np.fmax(lower, upper))
    return FreeEnergyTemperature(estimate, lower, upper)


def fit_power_law(lr, T):
    """Least-squares fit ln T = ln b + k ln lr over the points with finite lr > 0, T > 0.

    Returns (b, k, k_err): T = b * lr^k (b in units of T / lr^k), k dimensionless, k_err its
    standard error from the residuals (NaN with fewer than 3 points). NaN everywhere with
    fewer than 2 usable points or a single distinct lr. METHODS.md quantity 5b.
    """
    lr, T = np.asarray(lr, dtype=float).ravel(), np.asarray(T, dtype=float).ravel()
    m = np.isfinite(lr) & np.isfinite(T) & (lr > 0) & (T > 0)
    x, y = np.log(lr[m]), np.log(T[m])
    sxx = float(((x - x.mean()) ** 2).sum()) if x.size else 0.0
    if x.size < 2 or sxx <= 0:
        return np.nan, np.nan, np.nan
    k = float(((x - x.mean()) * y).sum() / sxx)
    ln_b = float(y.mean() - k * x.mean())
    resid = y - ln_b - k * x
    k_err = float(np.sqrt((resid**2).sum() / (x.size - 2) / sxx)) if x.size > 2 else np.nan
    return float(np.exp(ln_b)), k, k_err


# ---------------------------------------------------------------- first law (6)


def first_law_split(
    drift_speed2, diffusivity, learning_rate, dt_steps, n_params, valley_fraction=1.0
):
    """Split each interval's loss change per layer into work and heat (loss units).

    Arrays have steps on axis 0 (optionally layers on axis 1); row k is the interval
    (t_{k-1}, t_k]. ``drift_speed2`` v^2: squared drift speed per parameter (weight^2 /
    param / step^2, the ballistic term of MSD(tau) = D tau + v^2 tau^2); ``diffusivity`` D
    (weight^2 / param / step); ``learning_rate`` and ``dt_steps`` per row (1-D per-step
    arrays are broadcast over layers); ``n_params`` per layer.

        work_k = n v_k^2 dt_k / lr_k                    (>= 0: loss removed by the drift)
        heat_k = (f n / 2) (T_k - T_{k-1}),  T = D / (2 lr)   (net heat absorbed; row 0 NaN)

    so that the predicted loss change is dL_k = heat_k - work_k (first law, loss = internal
    energy, work done by the layer counted positive). Work: gradient flow along the river at
    speed |v| = lr |g| lowers the loss at rate |g|^2 lr = |v|^2 / lr (plain SGD, no momentum).
    Heat: the valley directions hold T/2 each (equipartition), so their loss changes by
    (n_valley / 2) dT; f = ``valley_fraction`` = n_valley / n is NOT identifiable from
    displacements (default 1: every coordinate is a valley direction, an upper bound on
    |heat|). The gross heat input lr T tr(H) per step and the equal gross dissipation need
    the curvature and are not computed. Source: Liu et al. 2025; METHODS.md quantity 6.
    """
    v2, D = np.asarray(drift_speed2, dtype=float), np.asarray(diffusivity, dtype=float)
    lr, dt = _along_steps(learning_rate, v2.ndim), _along_steps(dt_steps, v2.ndim)
    n = np.asarray(n_params, dtype=float)
    work = n * _ratio(v2 * dt, lr)
    T = _ratio(D, 2.0 * lr)
    heat = np.full(np.broadcast(T, n).shape, np.nan)
    heat[1:] = 0.5 * valley_fraction * n * np.diff(T, axis=0)
    return work, heat


def closure_error(work_by_layer, heat_by_layer, logged_dloss):
    """First-law closure residual per interval: logged dL - sum_layers (heat - work).

    Inputs (n_intervals, n_layers) from ``first_law_split`` and the logged loss change over
    each interval (n_intervals,), all in loss units. Zero when the layers' work and heat
    account for the logged change; divide by |logged dL| for a relative error. NaN where
    any layer is NaN. METHODS.md quantity 6.
    """
    predicted = (
        np.asarray(heat_by_layer, dtype=float) - np.asarray(work_by_layer, dtype=float)
    ).sum(axis=-1)
    return np.asarray(logged_dloss, dtype=float) - predicted


# ------------------------------------------------ heat capacity, conduction, schedules (7)


def heat_capacity(U, T):
    """Heat capacity C = dU/dT between stationary points sorted by T (finite differences).

    U: mean loss of each plateau/run (loss units); T: its temperature (loss units), so C is
    dimensionless (a count of thermalised directions: n/2 for n quadratic valley directions).
    Returns (T_mid, C), arrays of length n_points - 1 (NaN where consecutive T are equal).
    Source: Liu et al. 2025; METHODS.md quantity 7.
    """
    U, T = np.asarray(U, dtype=float), np.asarray(T, dtype=float)
    m = np.isfinite(U) & np.isfinite(T)
    order = np.argsort(T[m])
    u, t = U[m][order], T[m][order]
    return 0.5 * (t[1:] + t[:-1]), _ratio(np.diff(u), np.diff(t))


def _exp_relaxation(t, loss_inf, amplitude, rate):
    return loss_inf + amplitude * np.exp(-rate * t)


def relaxation_rate(steps, loss, change_step):
    """Rate r (per step) of loss(t) = L_inf + A exp(-r (t - t0)) after an LR change at t0.

    Nonlinear least squares on the points with step >= change_step; returns (r, r_err), r_err
    the white-noise standard error from the fit covariance (it understates the error when
    the residuals are autocorrelated, as one run's loss is); (NaN, NaN) with < 4 points or
    no convergence. Liu et al. 2025: the thermal loss of a valley of curvature a relaxes
    at r ~ 2 lr a after the change (exactly -2 ln|1 - lr a| per SGD step), so a = r / (2 lr).
    """
    t = np.asarray(steps, dtype=float) - float(change_step)
    y = np.asarray(loss, dtype=float)
    m = (t >= 0) & np.isfinite(t) & np.isfinite(y)
    t, y = t[m], y[m]
    if t.size < 4:
        return np.nan, np.nan
    tail = y[-max(1, t.size // 4) :].mean()
    far = np.abs(y - tail) < np.abs(y[0] - tail) / np.e
    r0 = 1.0 / max(t[np.argmax(far)] if far.any() else t[-1] / 3, t[1])
    try:
        p, cov = curve_fit(_exp_relaxation, t, y, p0=(tail, y[0] - tail, r0), maxfev=10000)
    except (RuntimeError, ValueError):
        return np.nan, np.nan
    return float(p[2]), float(np.sqrt(cov[2, 2]))


def schedule_diagnostics(lr_by_run, final_loss, steps_by_run=None) -> dict:
    """Liu et al.'s schedule relation: final loss ~ a + b * lr_min + c / lr_sum, over runs.

    lr_by_run: one array of learning rates per run (one value per optimizer step, or per
    logged step when ``steps_by_run`` gives the steps: then lr_sum = sum_k lr_k (s_{k+1} - s_k),
    each logged LR held until the next log). final_loss: one value per run (loss units).
    Returns {"min_lr", "lr_sum" (per run), "coef" (a, b, c), "predicted", "residual", "rank"};
    coef is NaN with fewer than 3 runs. Reading (Liu et al. 2025): the river (slow) loss falls with
    the distance travelled ~ lr_sum (first order in 1/lr_sum), the thermal (valley) loss left
    at the end is proportional to the final temperature ~ lr_min.
    """

    def lr_sum(lr, steps):
        return float(np.sum(lr) if steps is None else np.sum(lr[:-1] * np.diff(steps)))

    lrs = [np.asarray(x, dtype=float) for x in lr_by_run]
    steps = (
        [None] * len(lrs)
        if steps_by_run is None
        else [np.asarray(s, dtype=float) for s in steps_by_run]
    )
    y = np.asarray(final_loss, dtype=float)
    min_lr = np.array([np.nanmin(x) for x in lrs])
    total = np.array([lr_sum(x, s) for x, s in zip(lrs, steps)])
    X = np.column_stack([np.ones_like(min_lr), min_lr, _ratio(1.0, total)])
    coef, rank = np.full(3, np.nan), 0
    if len(y) >= 3 and np.isfinite(X).all() and np.isfinite(y).all():
        coef, _, rank, _ = np.linalg.lstsq(X, y, rcond=None)
    predicted = X @ coef
    return {
        "min_lr": min_lr,
        "lr_sum": total,
        "coef": coef,
        "predicted": predicted,
        "residual": y - predicted,
        "rank": int(rank),
    }


def _thermal_step(u, lr, curvature):
    """One SGD step of a valley's thermal loss in LR units: u' = (1 - lr a)^2 u + 2 a lr^2."""
    return (1.0 - lr * curvature) ** 2 * u + 2.0 * curvature * lr**2


def optimal_decay_loss_ratio(lr_schedule, curvature: float) -> float:
    """Final thermal loss of ``lr_schedule`` / that of the optimal (1/t) decay, same length.

    A valley of curvature a (loss / weight^2; lr * a is dimensionless per step) with gradient
    noise sigma^2 has mean thermal loss l = sigma^2 u / 4, where u follows
    u' = (1 - lr a)^2 u + 2 a lr^2 (exact for SGD on a quadratic); both schedules start in
    equilibrium at lr_schedule[0] (u0 = 2 lr0 / (2 - lr0 a)). The decay minimising the final
    thermal loss is greedy, lr_t = u_t / (a u_t + 2), i.e. ~ 1 / (a t + 2 / lr0) (the 1/t
    decay of Liu et al. 2025); since u' is increasing in u, greedy is optimal at every step, so the
    ratio is >= 1 (= 1 for the optimal schedule). Independent of sigma^2. ``curvature`` can
    be taken from ``relaxation_rate``: a = r / (2 lr). Dimensionless.
    """
    lrs = np.asarray(lr_schedule, dtype=float)
    u_sched = u_opt = 2.0 * lrs[0] / (2.0 - lrs[0] * curvature)
    for lr in lrs:
        u_sched = _thermal_step(u_sched, lr, curvature)
        u_opt = _thermal_step(u_opt, u_opt / (curvature * u_opt + 2.0), curvature)
    return float(u_sched / u_opt)


# ---------------------------------------------------------------- equilibrium (9)


def _relative_trend(y: np.ndarray, t: np.ndarray) -> np.ndarray:
    """|least-squares slope * time span| / |mean| per trailing window.

    y: (n_windows, n_quantities, w), t: (n_windows, w) -> (n_windows, n_quantities)."""
    tc = t - t.mean(axis=-1, keepdims=True)
    slope = _ratio((tc[:, None, :] * y).sum(-1), (tc**2).sum(-1)[:, None])
    return _ratio(np.abs(slope * (t[:, -1] - t[:, 0])[:, None]), np.abs(y.mean(-1)))


def equilibrium(macro, msd, steps, window: int, rel_tol: float, min_msd: float = 0.0):
    """Thermal equilibrium of one layer (the blog essay; METHODS.md quantity 9).

    macro: (n_steps, n_quantities) macroscopic state, e.g. rms, entropy, T (columns that are
    NaN at every step are ignored; a NaN inside a window makes that window non-stationary);
    msd: (n_steps,) mean squared displacement per parameter from the previous checkpoint;
    steps: (n_steps,); window: checkpoints per trailing window (>= 3).
    A step is equilibrated when, over the trailing window ending there, every quantity's
    fitted change |slope * span| / |mean| < rel_tol (stationary macroscopic state) while the
    parameters keep moving: every finite msd in the window > min_msd (at least one finite).
    Returns (equilibrated: bool (n_steps,), onset_step): onset_step is the step at which the
    final, uninterrupted equilibrated stretch begins (end of its first window), NaN when the
    last step is not equilibrated.
    """
    steps = np.asarray(steps, dtype=float)
    macro = np.asarray(macro, dtype=float).reshape(len(steps), -1)
    macro = macro[:, ~np.isnan(macro).all(axis=0)]
    msd = np.asarray(msd, dtype=float)
    eq = np.zeros(len(steps), dtype=bool)
    if len(steps) < window or window < 3 or macro.shape[1] == 0:
        return eq, np.nan
    y = sliding_window_view(macro, window, axis=0)  # (n_windows, q, w)
    trend = _relative_trend(y, sliding_window_view(steps, window))
    m = sliding_window_view(msd, window)
    moving = (np.where(np.isfinite(m), m, np.inf) > min_msd).all(-1) & np.isfinite(m).any(-1)
    eq[window - 1 :] = (trend < rel_tol).all(-1) & moving
    if not eq[-1]:
        return eq, np.nan
    not_eq = np.flatnonzero(~eq)
    return eq, float(steps[not_eq[-1] + 1 if not_eq.size else 0])
