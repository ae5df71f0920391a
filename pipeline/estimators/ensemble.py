"""Trajectory (ensemble) entropy of a window of checkpoints (SCIENCE.md quantity 5).

Source: Sadrtdinov, Klimov, Lobacheva & Vetrov (2025), "SGD as Free Energy Minimization"
(seed 002): at a fixed learning rate SGD settles into a stationary distribution of weight
vectors whose entropy S enters F = U - T S. Here S is estimated from the checkpoints of one
window at ~constant LR as a diagonal Gaussian of the per-coordinate fluctuations after a
per-coordinate linear fit in the step (the fit removes the slow river drift):

    S = 0.5 * sum_i ln(2 pi e Var_i)       [nats, extensive]

One implementation: ``window_log_var_sum(values, steps)`` computes sum_i ln Var_i from the
window's checkpoint values directly. The measure stage keeps the window's row blocks in its lag
buffer and calls it once when the window closes, so every checkpoint is read once and no
per-coordinate accumulators are kept; row blocks are additive (sum their values).
``window_frozen_count`` counts the coordinates that sum excludes as frozen. Only differences
between windows (same checkpoint count) are meaningful: the diagonal Gaussian ignores
correlations and the log of a sample variance with k = n_t - 2 degrees of freedom is biased by
psi(k/2) - ln(k/2) ~ -1/k per coordinate. See METHODS.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

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


def _window_chunks(values, steps, chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per chunk of coordinates: (residual variance, frozen mask), float64 / bool views of buffers
    that are reused for the next chunk (consume each pair before advancing).

    Residual variance: unbiased (n_t - 2 dof) variance of each coordinate's residuals about its
    least-squares line in the step. Frozen: variance <= (eps_fp32 * (|ref| + rms(c)))^2, ref the
    window's first value and c the centred values (constant or exactly linear coordinates).
    Float64 throughout: x = values - ref (exact for fp32 / bf16 inputs whose magnitudes are
    within a factor 2^29), one gemv gives the slopes, then the centred values and the
    residuals are formed explicitly, so there is no sum-of-squares cancellation. Float64 also
    makes each coordinate's result independent of where the chunk (or the caller's row block)
    boundaries fall to ~1e-16 relative (fp32 reductions differ by ~1e-7 between the SIMD body
    and tail), hence additivity over row blocks.
    """
    n_t = len(values)
    if n_t < 3:
        raise ValueError(f"ensemble window needs >= 3 checkpoints, got {n_t}")
    flat = [v.reshape(-1) for v in values]
    tau = np.asarray(steps, dtype=np.float64) - float(steps[0])
    tau_c = tau - tau.mean()
    stt = float(tau_c @ tau_c)
    device, n, f64 = flat[0].device, flat[0].numel(), torch.float64
    slope_w = torch.tensor(tau_c / stt if stt > 0 else np.zeros(n_t), dtype=f64, device=device)
    tau_c64 = torch.tensor(tau_c, dtype=f64, device=device)
    m0 = min(chunk, n)
    x, sq = (torch.empty((n_t, m0), dtype=f64, device=device) for _ in range(2))
    ref, mean, slope, css, var, scale = (torch.empty(m0, dtype=f64, device=device) for _ in range(6))
    frozen = torch.empty(m0, dtype=torch.bool, device=device)
    for start in range(0, n, chunk):  # reused buffers: no allocation inside the loop
        m = min(chunk, n - start)
        xs, sqs = x[:, :m], sq[:, :m]
        ref_, mean_, slope_, css_, var_, scale_, frozen_ = (b[:m] for b in (ref, mean, slope, css, var, scale, frozen))
        ref_.copy_(flat[0][start : start + m])
        for j, v in enumerate(flat):
            xs[j].copy_(v[start : start + m]).sub_(ref_)
        torch.mean(xs, 0, out=mean_)
        torch.mv(xs.T, slope_w, out=slope_)  # least-squares slope per coordinate
        xs -= mean_  # centred values
        torch.sum(torch.mul(xs, xs, out=sqs), 0, out=css_)
        xs.addr_(tau_c64, slope_, alpha=-1.0)  # residuals about the fitted line
        torch.sum(torch.mul(xs, xs, out=sqs), 0, out=var_).div_(n_t - 2.0)
        torch.abs(ref_, out=scale_).add_(css_.div_(n_t).sqrt_()).mul_(FP32_EPS).square_()
        torch.le(var_, scale_, out=frozen_)
        yield var_, frozen_


def window_log_var_sum(values, steps, chunk: int = 1 << 15) -> float:
    """sum_i ln Var_i over the non-frozen coordinates of one window of checkpoints.

    ``values``: one tensor per checkpoint of the window (same number of elements, float dtype,
    finite: the caller replaces non-finite values; weight units), ``steps`` their training
    steps. Var_i is the unbiased (n_t - 2 dof) variance of coordinate i's residuals about its
    least-squares line in the step. Units: ln(weight^2). Frozen coordinates (residual variance
    zero or below the fp32 resolution of the value, e.g. a constant bias or exactly linear
    motion) are excluded; count them with ``window_frozen_count``. Additive over disjoint sets
    of coordinates (row blocks). Raises ValueError with fewer than 3 checkpoints.

    Numerics: residuals and centred values are formed explicitly in float64 per chunk of
    ``chunk`` coordinates (see ``_window_chunks``), ln Var_i and its sum in float64; buffers
    are reused across chunks (memory ~ 2 n_t chunk x 8 B). Works on the values' device.
    """
    return window_statistics(values, steps, chunk)[0]


def window_frozen_count(values, steps, chunk: int = 1 << 15) -> int:
    """Number of coordinates ``window_log_var_sum`` excludes as frozen (same arguments)."""
    return window_statistics(values, steps, chunk)[1]


def window_statistics(values, steps, chunk: int = 1 << 15) -> tuple[float, int]:
    """(``window_log_var_sum``, ``window_frozen_count``) in one pass over the window."""
    total, n_frozen = 0.0, 0
    for var, frozen in _window_chunks(values, steps, chunk):
        n_frozen += int(frozen.sum())
        total += float(var.masked_fill_(frozen, 1.0).log_().sum(dtype=torch.float64))
    return total, n_frozen
