"""Trajectory (ensemble) entropy of a window of checkpoints (METHODS.md quantity 5a).

Source: Sadrtdinov, Klimov, Lobacheva & Vetrov (2025), "SGD as Free Energy Minimization":
at a fixed learning rate SGD settles into a stationary distribution of weight
vectors whose entropy S enters F = U - T S. Here S is estimated from the checkpoints of one
window at ~constant LR as a diagonal Gaussian of the per-coordinate fluctuations after a
per-coordinate linear fit in the step (the fit removes the slow river drift):

    S = 0.5 * sum_i ln(2 pi e Var_i)       [nats, extensive]

One implementation: ``increment_window_statistics`` computes sum_i ln Var_i (and the frozen
count) from the window's increments between consecutive checkpoints; ``window_log_var_sum``
(values, steps) forms the increments and calls it. The measure stage already holds the last
max_lag increments of each row slice (for the distance band) and passes them when the window
closes, so every checkpoint is read once and no per-coordinate accumulators are kept; row
blocks are additive (sum their values).
``window_frozen_count`` counts the coordinates that sum excludes as frozen. Only differences
between windows (same checkpoint count) are meaningful: the diagonal Gaussian ignores
correlations and the log of a sample variance with k = n_t - 2 degrees of freedom is biased by
psi(k/2) - ln(k/2) ~ -1/k per coordinate. See METHODS.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch

LN_2PIE = math.log(2.0 * math.pi * math.e)
FP32_EPS = float(torch.finfo(torch.float32).eps)


def ensemble_entropy(log_var_sum, n_params):
    """Diagonal-Gaussian ensemble entropy S = 0.5 * (n ln(2 pi e) + sum_i ln Var_i), in nats
    (extensive). ``n_params`` = coordinates included in ``log_var_sum`` (layer size minus
    ``window_frozen_count``). Works on floats or numpy arrays."""
    return 0.5 * (n_params * LN_2PIE + log_var_sum)


def ensemble_entropy_per_param(log_var_sum, n_params):
    """``ensemble_entropy`` divided by ``n_params``: nats per parameter."""
    return ensemble_entropy(log_var_sum, n_params) / n_params


@lru_cache(maxsize=64)
def _window_operator(steps: tuple) -> tuple[np.ndarray, float]:
    """((r + 1, n_t - 1) operator, stt) acting on a coordinate's n_t - 1 increments
    (value_j - value_{j-1}): rows 0..r-1 give its residuals about the least-squares line in
    the step in an orthonormal basis of the residual space (U^T C, with U U^T = I - P, P the
    projector onto span{1, step}, C the cumulative sum that turns increments into values minus
    the first value; r = n_t - 2 rows, so the residual sum of squares is the squared norm of
    r numbers instead of n_t), the last row its slope. stt = sum of squared centred steps."""
    tau = np.asarray(steps, dtype=np.float64) - float(steps[0])
    tau_c = tau - tau.mean()
    stt = float(tau_c @ tau_c)
    n_t = tau.size
    basis = np.stack([np.ones(n_t), tau_c], axis=1) if stt > 0 else np.ones((n_t, 1))
    q, _ = np.linalg.qr(basis, mode="complete")
    residual_basis = q[:, basis.shape[1] :]  # U: orthonormal, U U^T = I - P
    slope_w = tau_c / stt if stt > 0 else np.zeros(n_t)
    cumulative = np.tril(
        np.ones((n_t, n_t - 1)), k=-1
    )  # value_j - value_0 = sum_{i<j} increment_{i+1}
    return np.vstack([residual_basis.T, slope_w]) @ cumulative, stt


def _window_chunks(
    increments: torch.Tensor, rows, steps, ref: torch.Tensor, chunk: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per chunk of coordinates: (residual variance, frozen mask), fp32 / bool views of buffers
    that are reused for the next chunk (consume each pair before advancing); the mask is None
    when a cheap bound shows no coordinate of the chunk can be frozen (``_none_frozen``).

    ``increments``: a (r, n) fp32 tensor whose row ``rows[j-1]`` holds value_j - value_{j-1}
    of the window (j = 1..n_t-1; other rows are ignored but must be finite); ``ref`` the
    window's first values. Residual variance: unbiased (n_t - 2 dof) variance of each
    coordinate's residuals about its least-squares line in the step. Frozen: variance <=
    (eps_fp32 * (|ref| + rms(c)))^2, c the centred values (constant or exactly linear
    coordinates). Numerics (fp32): increments of fp32 / bf16 values within a factor 2 of each
    other are exact (Sterbenz), so a constant coordinate gives exactly 0; residuals (in an
    orthonormal basis of the residual space, n_t - 2 numbers) and slope come from one
    (n_t - 1, r) x (r, chunk) product; centred sum of squares = residual sum +
    slope^2 stt. Rounding error of a residual ~ eps_fp32 |value - ref|: relative error ~1e-7 x
    (drift over the window / fluctuation) in each coordinate's variance.
    """
    n_t = len(steps)
    if n_t < 3:
        raise ValueError(f"ensemble window needs >= 3 checkpoints, got {n_t}")
    operator, stt = _window_operator(tuple(float(s) for s in steps))
    scattered = np.zeros((operator.shape[0], increments.shape[0]))
    scattered[:, list(rows)] = operator
    device, n, f32 = increments.device, increments.shape[1], torch.float32
    op = torch.tensor(scattered, dtype=f32, device=device)
    m0 = min(chunk, n)
    y = torch.empty((operator.shape[0], m0), dtype=f32, device=device)
    var, scale = (torch.empty(m0, dtype=f32, device=device) for _ in range(2))
    frozen = torch.empty(m0, dtype=torch.bool, device=device)
    for start in range(0, n, chunk):  # reused buffers: no allocation inside the loop
        m = min(chunk, n - start)
        ys, var_, scale_, frozen_ = y[:, :m], var[:m], scale[:m], frozen[:m]
        torch.mm(op, increments[:, start : start + m], out=ys)
        resid, slope = ys[:-1], ys[-1]
        torch.sum(resid.mul_(resid), 0, out=var_)  # residual sum of squares
        ref_ = ref[start : start + m]
        if _none_frozen(var_, slope, ref_, stt, n_t):
            yield var_.div_(n_t - 2.0), None
            continue
        torch.addcmul(var_, slope, slope, value=stt, out=scale_).div_(n_t).sqrt_()  # rms(c)
        scale_.add_(ref_.abs()).mul_(FP32_EPS).square_()
        var_.div_(n_t - 2.0)
        torch.le(var_, scale_, out=frozen_)
        yield var_, frozen_


def _none_frozen(rss: torch.Tensor, slope: torch.Tensor, ref: torch.Tensor, stt, n_t) -> bool:
    """True when no coordinate of the chunk can be frozen, from five reductions instead of the
    per-coordinate test (which costs about eight passes): frozen needs rss / (n_t - 2) <=
    (eps (|ref| + rms(c)))^2 with rms(c)^2 = (rss + slope^2 stt) / n_t, so the smallest
    variance above that threshold at the largest |ref|, rss and |slope| (float64, 1% margin
    over the fp32 rounding of the exact test) rules every coordinate out. Results are the
    same either way; only time differs (a chunk with any tiny variance takes the exact test)."""
    if rss.numel() == 0:
        return False
    lo, hi = float(rss.amin()), float(rss.amax())
    big_ref = max(-float(ref.amin()), float(ref.amax()))
    big_slope = max(-float(slope.amin()), float(slope.amax()))
    rms = math.sqrt(max(hi + big_slope * big_slope * stt, 0.0) / n_t)
    bound = (FP32_EPS * (big_ref + rms)) ** 2
    return math.isfinite(bound) and lo / (n_t - 2.0) > 1.01 * bound


def increment_window_statistics(
    increments: torch.Tensor, rows, steps, ref: torch.Tensor, chunk: int = 1 << 15
) -> tuple[float, int]:
    """(sum_i ln Var_i over non-frozen coordinates, frozen count) of a window given as
    increments: row ``rows[j-1]`` of the (r, n) fp32 ``increments`` holds value_j -
    value_{j-1} (j = 1..n_t-1), ``ref`` (n,) the first values, ``steps`` the n_t steps. The
    measure stage passes its ring of increments as is (no copy). See ``window_statistics``."""
    total, n_frozen = 0.0, 0
    for var, frozen in _window_chunks(increments, rows, steps, ref.reshape(-1), chunk):
        if frozen is not None:
            n_frozen += int(frozen.sum())
            var.masked_fill_(frozen, 1.0)
        total += float(_log_(var).sum())  # fp32 per chunk, float64 across
    return total, n_frozen


def _log_(x: torch.Tensor) -> torch.Tensor:
    """Natural log in place. On the CPU through numpy, whose vectorised fp32 log takes half
    the time of torch's here (results agree to 1 ulp); elsewhere torch's."""
    if x.device.type == "cpu" and x.is_contiguous():
        np.log(x.numpy(), out=x.numpy())
        return x
    return x.log_()


def window_log_var_sum(values, steps, chunk: int = 1 << 15) -> float:
    """sum_i ln Var_i over the non-frozen coordinates of one window of checkpoints.

    ``values``: one tensor per checkpoint of the window (same number of elements, float dtype,
    finite: the caller replaces non-finite values; weight units), ``steps`` their training
    steps. Var_i is the unbiased (n_t - 2 dof) variance of coordinate i's residuals about its
    least-squares line in the step. Units: ln(weight^2). Frozen coordinates (residual variance
    zero or below the fp32 resolution of the value, e.g. a constant bias or exactly linear
    motion) are excluded; count them with ``window_frozen_count``. Additive over disjoint sets
    of coordinates (row blocks). Raises ValueError with fewer than 3 checkpoints.

    Numerics: fp32 per chunk of ``chunk`` coordinates (see ``_window_chunks``): ln Var_i
    summed in fp32 within a chunk, chunk sums in float64 (relative error ~1e-7 of the total,
    so sums over row blocks agree with the whole to ~1e-7); buffers are reused across chunks
    (memory ~ (n_t + 1) chunk x 4 B plus the window's increments). Works on the values' device.
    """
    return window_statistics(values, steps, chunk)[0]


def window_frozen_count(values, steps, chunk: int = 1 << 15) -> int:
    """Number of coordinates ``window_log_var_sum`` excludes as frozen (same arguments)."""
    return window_statistics(values, steps, chunk)[1]


def window_statistics(values, steps, chunk: int = 1 << 15) -> tuple[float, int]:
    """(``window_log_var_sum``, ``window_frozen_count``) in one pass over the window, from the
    values of its checkpoints (one tensor each; their increments are formed here)."""
    if len(values) < 3:
        raise ValueError(f"ensemble window needs >= 3 checkpoints, got {len(values)}")
    flat = [v.reshape(-1).to(torch.float32) for v in values]
    increments = torch.stack([b - a for a, b in zip(flat, flat[1:])])
    return increment_window_statistics(increments, range(len(flat) - 1), steps, flat[0], chunk)
