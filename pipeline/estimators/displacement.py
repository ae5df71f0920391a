"""Local temperature from checkpoint displacements (METHODS.md quantity 3).

Measurement primitive (streaming stage): the squared-distance band
``d2[t, k] = sum_i (theta_{t,i} - theta_{t-k,i})^2`` for lags ``k = 1..max_lag`` in checkpoint
units, summed over one layer's coordinates (weight^2; additive over row blocks).

Estimator (``diffusivity_from_band``), for the trailing window of ``window + 1`` checkpoints
ending at each checkpoint:

1. Rebuild the window's pairwise squared-distance matrix ``D2`` from the band.
2. Linear detrending in time: with ``P`` the projector onto span{1, s} (s = checkpoint steps),
   the detrended residual Gram matrix is ``R = -1/2 (I-P) D2 (I-P)`` (polarisation identity; the
   constant and linear-in-time part of every coordinate -- the river drift, and the locally
   linear relaxation of valley directions out of equilibrium -- is removed exactly).
3. Model: each coordinate = a + v*s + Brownian motion with diffusivity D per step, so
   ``E[R] = n D (I-P) K (I-P)`` with ``K_st = min(s_s, s_t)``. Per checkpoint lag k the
   detrended pair distances summed over the pairs (a, a+k) of the window give an unbiased
   ``D(tau_k)`` for Brownian motion + drift, tau_k = mean step difference of those pairs.
4. Mean reversion in stiff (valley) directions makes ``D(tau)`` fall with tau. A generalised
   least-squares line ``D(tau) = c0 + c1 tau`` through the first ``fit_lags`` lags, weighted by
   the exact covariance of the per-lag estimates under the Brownian null, extrapolated to
   ``tau = 0`` removes the leading remaining bias. (Detrending already cancels the first-order
   mean-reversion term -kappa*s*t of the OU covariance, which is rank one in s.) That value,
   D0, is the reported diffusivity.

Units: D in weight^2 / parameter / step; T = D / (2 lr) in loss units (METHODS.md, Conventions).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from pipeline.core.reasons import TemperatureReason
from pipeline.core.windows import checkpoint_windows

_CHUNK = 1 << 16  # elements reduced in fp32 before the fp64 accumulation

# identifiability thresholds (see METHODS.md for their calibration)
MAX_RELATIVE_CORRECTION = 0.1  # |D0 - D(tau_1)| / D0 above this: spacing too coarse
MIN_LAG_RATIO = 0.75  # D(tau_2) / D(tau_1) below this: MSD saturates between the first lags
EVAL_LAG_STEPS = 0.0  # the D(tau) line is read at tau -> 0 (METHODS.md: D = lim MSD/tau)


def sq_distance_band(current: torch.Tensor, previous: list[torch.Tensor]) -> np.ndarray:
    """Squared Euclidean distances between one block of values and earlier blocks.

    Estimates nothing: the exact ``sum_i (current_i - previous[k-1]_i)^2`` for each k, in
    weight^2. Elements are upcast to fp32 (bf16/fp16 exactly). One pass over chunks of 65536
    elements: the chunk of ``current`` stays in cache while every lag's difference is formed
    in a reused fp32 scratch buffer and reduced in fp32 (``torch.dot``), chunk sums accumulated
    in float64 (no fp64 copy of the block, no per-lag temporary of block size). Elements where
    either side is NaN/Inf are left out of the sum (a chunk whose fp32 sum is not finite is
    recomputed with a mask); count them with ``(~torch.isfinite(x)).sum()`` in the caller.

    ``previous[k-1]`` is the same block k checkpoints back; returns float64 array (len(previous),).
    """
    cur = current.reshape(-1).to(torch.float32)
    prevs = [p.reshape(-1).to(torch.float32) for p in previous]
    for k, p in enumerate(prevs):
        if p.numel() != cur.numel():
            raise ValueError(f"block sizes differ: {cur.numel()} vs {p.numel()} at lag {k + 1}")
    totals = [0.0] * len(prevs)
    chunk = _CHUNK if cur.device.type == "cpu" else max(cur.numel(), 1)  # GPU: one launch per lag
    scratch = torch.empty(min(chunk, cur.numel()), dtype=torch.float32, device=cur.device)
    for start in range(0, cur.numel(), chunk):
        c = cur[start : start + chunk]
        diff = scratch[: c.numel()]
        for k, p in enumerate(prevs):
            torch.sub(c, p[start : start + chunk], out=diff)
            part = float(torch.dot(diff, diff))
            if not np.isfinite(part):
                part = _masked_sq_sum(c, p[start : start + chunk])
            totals[k] += part
    return np.asarray(totals, dtype=np.float64)


def band_from_increment_dots(previous_band: np.ndarray, dots: np.ndarray) -> np.ndarray:
    """The squared-distance band of checkpoint t from that of t-1 and increment dot products.

    With increments ``delta_t = theta_t - theta_{t-1}``,
    ``|theta_t - theta_{t-k}|^2 = |theta_{t-1} - theta_{t-(k-1)}|^2 + delta_t.delta_t
    + 2 sum_{j=1}^{k-1} delta_t.delta_{t-j}`` (expand the sum of the last k increments). So
    one matrix-vector product of the new increment with the last ``max_lag`` increments gives
    every lag, instead of one subtraction and reduction per lag (exact algebra; float64 here).

    ``previous_band[k-1]``: band of t-1 at lag k (NaN where t-1 lacks that history);
    ``dots[j] = delta_t.delta_{t-j}`` for j = 0..max_lag-1 (NaN where delta_{t-j} does not
    exist). Returns the band of t (weight^2), NaN where t lacks the history. Valid when all the
    values involved are finite; the caller uses ``sq_distance_band`` otherwise.
    """
    previous = [float(x) for x in previous_band]
    g = [float(x) for x in dots]
    band, partial = [g[0]], 0.0  # lag 1: g0; lag k: band_{t-1}(k-1) + g0 + 2 sum_{0<j<k} g_j
    for k in range(1, len(g)):
        partial += g[k]  # the same float64 additions, in the same order, as a cumulative sum
        band.append(previous[k - 1] + (g[0] + 2.0 * partial))
    return np.asarray(band, dtype=np.float64)  # plain floats: ~10x less overhead than numpy


def _masked_sq_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum (a - b)^2 over the elements finite on both sides (fp32 reduction)."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    diff = torch.where(ok, a - b, torch.zeros((), dtype=a.dtype, device=a.device))
    return float(torch.dot(diff, diff))


def rounding_noise_var(values: torch.Tensor) -> float:
    """Mean variance per element of round-to-nearest quantisation of ``values``' storage dtype.

    For a value x stored with p significand bits (bf16: 8, fp16: 11, fp32: 24) the rounding
    error is ~uniform on +-ulp(x)/2, variance ulp(x)^2 / 12 with ulp(x) = 2^(floor(log2|x|)-p+1).
    Returns the mean over finite non-zero elements in weight^2 (0 for float64). Assumes
    independent rounding errors between checkpoints, valid when a coordinate moves by more than
    an ulp between checkpoints; pass as ``white_noise_var`` to ``diffusivity_from_band``.

    floor(log2|x|) is read exactly from the exponent field of x widened to fp32 (exact for
    all three dtypes): one histogram of the 256 exponents instead of a log per element, and
    no rounding of log2 up to the next integer just below a power of two. fp32 subnormals
    (exponent field 0) take the log2 path.
    """
    bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}.get(values.dtype)
    if bits is None:
        return 0.0
    x = _fp32_bits(values)
    field = (x >> 23) & 0xFF
    counts = torch.bincount(torch.from_numpy(field), minlength=256).numpy().astype(np.float64)
    ulp_sq = np.exp2(2.0 * (np.arange(256) - 127.0 - (bits - 1)))  # of normals, by field
    total, n = float(counts[1:255] @ ulp_sq[1:255]), float(counts[1:255].sum())
    if counts[0] > 0:  # zeros (ignored) and subnormals
        tiny = torch.from_numpy(x[(field == 0) & ((x & 0x7FFFFFFF) != 0)].view(np.float32))
        ulp = torch.exp2(torch.floor(torch.log2(tiny.abs())) - (bits - 1)).to(torch.float64)
        total, n = total + float((ulp * ulp).sum()), n + tiny.numel()
    return total / n / 12.0 if n else 0.0


def on_bf16_grid(values: torch.Tensor) -> bool:
    """True when every finite value is exactly representable in bfloat16.

    fp32 checkpoints whose values all lie on the bf16 grid come from pure-bf16 training
    exported to fp32 (a random fp32 value is on the grid with probability 2^-16, so a sample of
    thousands decides). Such a series holds the exact training state: no rounding happened at
    export, so no white rounding noise is subtracted (METHODS.md, "bf16"). Read from the bits:
    a finite fp32 value is on the grid when its 16 low bits are zero (exponent field < 255).
    """
    x = _fp32_bits(values)
    special = (x & 0x7F800000) == 0x7F800000  # Inf, NaN
    return bool(not special.all() and not ((x & 0xFFFF).astype(bool) & ~special).any())


def _fp32_bits(values: torch.Tensor) -> np.ndarray:
    """The bit patterns (int32) of ``values`` widened to fp32 (exact for bf16/fp16/fp32)."""
    return values.detach().reshape(-1).to(torch.float32).cpu().numpy().view(np.int32)


@lru_cache(maxsize=256)
def _window_design(rel_steps: tuple, fit_lags: int):
    """Matrices that depend only on the window's relative steps (cached for even spacing)."""
    s = np.asarray(rel_steps, dtype=np.float64)
    m = s.size
    basis, _ = np.linalg.qr(np.stack([np.ones(m), s - s.mean()], axis=1))
    proj = np.eye(m) - basis @ basis.T  # I - P
    brown = proj @ np.minimum.outer(s, s) @ proj  # detrended Brownian covariance, D = 1
    lag_ops, taus = [], []
    for k in range(1, fit_lags + 1):
        a = np.arange(m - k)
        e = np.zeros((m, m))
        np.add.at(e, (a, a), 1.0)
        np.add.at(e, (a + k, a + k), 1.0)
        np.add.at(e, (a, a + k), -1.0)
        np.add.at(e, (a + k, a), -1.0)
        lag_ops.append(proj @ e @ proj)  # M_k: sum of detrended pair distances at lag k
        taus.append(float(np.mean(s[a + k] - s[a])))
    kmat = brown
    den = np.array([np.trace(mk @ kmat) for mk in lag_ops])
    white = np.array([np.trace(mk) for mk in lag_ops])  # white noise of variance 1 per coord
    # covariance of the per-lag estimates under the Brownian null, n = 1, D = 1
    mk_k = [mk @ kmat for mk in lag_ops]
    cov = np.array([[2.0 * np.trace(a @ b) for b in mk_k] for a in mk_k]) / np.outer(den, den)
    centred = s - s.mean()
    slope_w = centred / np.dot(centred, centred)  # weights of the least-squares slope
    slope_noise = float(slope_w @ np.minimum.outer(s, s) @ slope_w)
    return proj, brown, lag_ops, np.array(taus), den, white, cov, slope_w, slope_noise


def _window_d2(d2: np.ndarray, start: int, end: int) -> np.ndarray:
    """Pairwise squared distances of checkpoints start..end from the band."""
    m = end - start + 1
    out = np.zeros((m, m))
    for b in range(1, m):
        lags = np.arange(1, b + 1)
        out[b - lags, b] = d2[start + b, lags - 1]
    return out + out.T


def _gls_line_at(y: np.ndarray, tau: np.ndarray, cov: np.ndarray, tau_eval: float):
    """GLS line y = c0 + c1 tau evaluated at tau_eval: value, variance, chi^2 / dof."""
    if y.size == 1:
        return y[0], cov[0, 0], 1.0
    design = np.stack([np.ones_like(tau), tau], axis=1)
    icov = np.linalg.inv(cov)
    fisher = np.linalg.inv(design.T @ icov @ design)
    coef = fisher @ design.T @ icov @ y
    resid = y - design @ coef
    dof = y.size - 2
    chi2 = float(resid @ icov @ resid) / dof if dof > 0 else 1.0
    at = np.array([1.0, tau_eval])
    return float(at @ coef), float(at @ fisher @ at), chi2


def _window_estimate(d2w, rel_steps, n_params, fit_lags, white_noise_var, offset_steps=0.0):
    """D0, its error, the reason code (0: identified) and |v|^2 of one window."""
    proj, brown, lag_ops, taus, den, white, cov, slope_w, slope_noise = _window_design(
        rel_steps, fit_lags
    )
    resid_gram = -0.5 * proj @ d2w @ proj
    num = np.array([np.sum(mk * resid_gram) for mk in lag_ops]) - n_params * white_noise_var * white
    # momentum: pair distances D (|ds| - offset) = Brownian + white noise of variance -D offset/2
    per_lag = num / (n_params * (den - 0.5 * offset_steps * white))
    d0, var0, chi2 = _gls_line_at(per_lag, taus, cov, EVAL_LAG_STEPS)
    scale = max(abs(d0), abs(per_lag[0]))
    err = np.sqrt(var0 / n_params) * scale * np.sqrt(max(1.0, chi2))
    d_window = np.trace(resid_gram) / (n_params * np.trace(brown))
    speed2 = (-0.5 * slope_w @ d2w @ slope_w) / n_params - d_window * slope_noise
    if not (np.isfinite(d0) and d0 > 0 and err < d0):
        reason = TemperatureReason.NO_DIFFUSION_SIGNAL
    elif abs(d0 - per_lag[0]) > MAX_RELATIVE_CORRECTION * d0 or (
        per_lag.size >= 2 and per_lag[1] < MIN_LAG_RATIO * per_lag[0]
    ):
        reason = TemperatureReason.SPACING_TOO_COARSE
    else:
        reason = TemperatureReason.IDENTIFIED
    return d0, err, int(reason), speed2


def diffusivity_from_band(
    steps: np.ndarray,
    d2: np.ndarray,
    n_params: int,
    window: int,
    fit_lags: int = 3,
    white_noise_var: float = 0.0,
    offset_steps: float = 0.0,
    min_window: int | None = None,
) -> dict:
    """Noise diffusivity D (weight^2 / parameter / step) of one layer from its distance band.

    Assumes each coordinate moves as Brownian motion (diffusivity D per step, isotropic over
    the layer's n_params coordinates) plus a drift that is linear in time within the window
    (river), with mean reversion of valley directions slow compared with the checkpoint
    spacing (first-order effect removed by extrapolating D(tau) to tau = 0). ``steps`` are the
    checkpoints' training steps (any spacing), ``d2[t, k-1]`` the band (NaN before the series
    has k checkpoints), ``window`` <= d2.shape[1] the widest window in intervals,
    ``min_window`` None for trailing windows of ``window`` intervals, else centred windows
    shrinking to ``min_window`` intervals at the ends of the series (``checkpoint_windows``),
    ``fit_lags`` the lags used for the extrapolation (fewer in a window with fewer intervals),
    ``white_noise_var`` a known white measurement noise per coordinate (weight^2, e.g. bf16
    rounding, ``rounding_noise_var``), ``offset_steps`` the known shortfall of the squared
    displacement that momentum causes (``preconditioned.momentum_offset_steps``; pair
    distances ~ D (|ds| - offset_steps)).

    Returns arrays over checkpoints (NaN where the window lacks history or values):
    ``diffusivity`` D0; ``diffusivity_err`` its 1-sigma error (GLS under the Brownian null,
    inflated by sqrt(chi^2/dof) of the fit); ``reason`` (int8, ``TemperatureReason``): 0
    identified; 1 no window; 6 non-finite distances; 7 D0 <= 0 or err >= D0; 2 when the
    extrapolation corrects D(tau_1) by more than 10% or D(tau_2) < 0.75 D(tau_1) (spacing too
    coarse for the stiffest directions carrying the noise); ``identifiable`` = (reason == 0);
    ``drift_speed2`` |v|^2 per parameter per step^2 of the window's fitted linear motion, minus
    the Brownian contribution to the fitted slope; ``window_start``/``window_end`` the
    window's checkpoint indices (-1: none).
    """
    steps = np.asarray(steps, dtype=np.int64)
    d2 = np.asarray(d2, dtype=np.float64)
    if d2.ndim != 2 or d2.shape[0] != steps.size:
        raise ValueError(
            f"d2 must be (n_checkpoints, max_lag); got {d2.shape} for {steps.size} steps"
        )
    if not 1 <= window <= d2.shape[1]:
        raise ValueError(f"window {window} must be in 1..max_lag={d2.shape[1]}")
    if np.any(np.diff(steps) <= 0):
        raise ValueError("steps must be strictly increasing")
    n = steps.size
    starts, ends = checkpoint_windows(n, window, min_window)
    result = {
        "diffusivity": np.full(n, np.nan),
        "diffusivity_err": np.full(n, np.nan),
        "reason": np.full(n, int(TemperatureReason.TOO_FEW_CHECKPOINTS), dtype=np.int8),
        "drift_speed2": np.full(n, np.nan),
        "window_start": starts,
        "window_end": ends,
    }
    for t, (start, end) in enumerate(zip(starts, ends)):
        if start < 0 or n_params <= 0:
            continue
        d2w = _window_d2(d2, start, end)
        if not np.all(np.isfinite(d2w)):
            result["reason"][t] = TemperatureReason.MISSING_VALUES
            continue
        rel = tuple(int(x) for x in steps[start : end + 1] - steps[start])
        fit = max(1, min(fit_lags, end - start))
        d0, err, reason, speed2 = _window_estimate(
            d2w, rel, n_params, fit, white_noise_var, offset_steps
        )
        result["diffusivity"][t] = d0
        result["diffusivity_err"][t] = err
        result["reason"][t] = reason
        result["drift_speed2"][t] = speed2
    result["identifiable"] = result["reason"] == TemperatureReason.IDENTIFIED
    return result


def window_learning_rate(
    steps: np.ndarray,
    log_steps: np.ndarray,
    log_lr: np.ndarray,
    window: int,
    min_window: int | None = None,
) -> np.ndarray:
    """Mean learning rate over the steps covered by each checkpoint's window (NaN without a log).

    Windows as in ``diffusivity_from_band`` (``checkpoint_windows``). The LR log is read as
    piecewise constant from each logged step to the next; the mean is over the training steps
    s_start < step <= s_end (the updates the window's displacements contain). Used to turn a
    window's D into T = D / (2 <lr>).
    """
    steps = np.asarray(steps, dtype=np.int64)
    out = np.full(steps.size, np.nan)
    log_steps = np.asarray(log_steps, dtype=np.int64)
    log_lr = np.asarray(log_lr, dtype=np.float64)
    ok = np.isfinite(log_lr)
    log_steps, log_lr = log_steps[ok], log_lr[ok]
    if log_steps.size == 0:
        return out
    order = np.argsort(log_steps)
    log_steps, log_lr = log_steps[order], log_lr[order]
    starts, ends = checkpoint_windows(steps.size, window, min_window)
    for t, (start, end) in enumerate(zip(starts, ends)):
        if start < 0:
            continue
        grid = np.arange(steps[start] + 1, steps[end] + 1)
        idx = np.searchsorted(log_steps, grid, side="right") - 1
        out[t] = np.mean(log_lr[np.clip(idx, 0, None)])
    return out


def temperature_from_diffusivity(diffusivity, diffusivity_err, learning_rate):
    """Temperature T = D / (2 lr) and its error, in loss units (Einstein relation).

    Assumes the update theta -= lr * (grad + noise), so D = lr^2 sigma^2 = 2 lr T. For a window
    pass the window's mean LR (``window_learning_rate``). NaN where lr is unknown, <= 0 or
    non-finite: without a learning rate only D is reported.
    """
    d = np.asarray(diffusivity, dtype=np.float64)
    e = np.asarray(diffusivity_err, dtype=np.float64)
    lr = np.broadcast_to(np.asarray(learning_rate, dtype=np.float64), np.broadcast(d, e).shape)
    good = np.isfinite(lr) & (lr > 0)
    safe = np.where(good, lr, 1.0)
    temp = np.where(good, d / (2.0 * safe), np.nan)
    temp_err = np.where(good, e / (2.0 * safe), np.nan)
    return temp, temp_err
