"""Trajectory (ensemble) entropy of a window of checkpoints (SCIENCE.md quantity 5).

Source: Sadrtdinov, Klimov, Lobacheva & Vetrov (2025), "SGD as Free Energy Minimization"
(seed 002): at a fixed learning rate SGD settles into a stationary distribution of weight
vectors whose entropy S enters F = U - T S. Here S is estimated from the checkpoints of one
window at ~constant LR as a diagonal Gaussian of the per-coordinate fluctuations after a
per-coordinate linear fit in the step (the fit removes the slow river drift):

    S = 0.5 * sum_i ln(2 pi e Var_i)       [nats, extensive]

The fold is streaming: the measure stage calls ``ensemble_update`` once per checkpoint on a
row block, so every checkpoint is read once; blocks are additive (sum their
``ensemble_log_var_sum``). Only differences between windows (same checkpoint count) are
meaningful: the diagonal Gaussian ignores correlations and the log of a sample variance with
k = n_t - 2 degrees of freedom is biased by psi(k/2) - ln(k/2) ~ -1/k per coordinate.
See docs/methods/thermodynamics.md.
"""

from __future__ import annotations

import math

import numpy as np
import torch

LN_2PIE = math.log(2.0 * math.pi * math.e)
FP32_EPS = float(torch.finfo(torch.float32).eps)


def ensemble_init(n: int, device: str | torch.device = "cpu") -> dict:
    """Empty accumulators for ``n`` coordinates (float64, on ``device``; moved to the device of
    the first ``values`` passed to ``ensemble_update``).

    Keys: ``count`` (checkpoints folded), ``t0`` (first step), ``st``/``stt`` (sums of
    tau = t - t0 and tau^2), ``ref`` (first checkpoint's values), ``sx``/``sxx``/``stx``
    (per-coordinate sums of x = values - ref, x^2 and tau*x). Shifting by the window's first
    value and step keeps the fp64 sums free of cancellation for weights far from zero.
    """
    zeros = lambda: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
    scalar = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
    return {"count": scalar(), "t0": scalar(), "st": scalar(), "stt": scalar(),
            "ref": zeros(), "sx": zeros(), "sxx": zeros(), "stx": zeros()}


def ensemble_update(state: dict, values: torch.Tensor, t: float) -> dict:
    """Fold one checkpoint's values (any shape, flattened, weight units) at step ``t``.

    Updates ``state`` in place and returns it. Non-finite values must be replaced by the
    caller (the measure stage passes zeros and counts them separately).
    """
    x = values.detach().reshape(-1)
    if int(state["count"]) == 0:
        state.update(ensemble_init(x.numel(), x.device))
        state["ref"] = x.to(torch.float64).clone()
        state["t0"] += float(t)
    x = x.to(state["ref"].device, torch.float64) - state["ref"]
    tau = float(t) - float(state["t0"])
    state["count"] += 1.0
    state["st"] += tau
    state["stt"] += tau * tau
    state["sx"] += x
    state["sxx"] += x * x
    state["stx"] += tau * x
    return state


def _residual_variance(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate unbiased variance of the residuals of a linear fit in the step
    (n_t - 2 degrees of freedom), and a mask of coordinates whose residual variance is below
    the fp32 resolution of the coordinate (treated as frozen)."""
    n = float(state["count"])
    if n < 3:
        raise ValueError(f"ensemble window needs >= 3 checkpoints, got {int(n)}")
    stt = float(state["stt"]) - float(state["st"]) ** 2 / n
    sxx = state["sxx"] - state["sx"] ** 2 / n
    stx = state["stx"] - float(state["st"]) * state["sx"] / n
    ss = sxx - (stx * stx / stt if stt > 0 else 0.0)
    var = ss.clamp_min(0.0) / (n - 2.0)
    scale = state["ref"].abs() + (sxx.clamp_min(0.0) / n).sqrt()
    frozen = var <= (FP32_EPS * scale) ** 2
    return var, frozen


def ensemble_log_var_sum(state: dict) -> float:
    """sum_i ln Var_i over the non-frozen coordinates, Var_i the unbiased (n_t - 2 dof)
    variance of coordinate i's residuals about its least-squares line in the step.

    Units: ln(weight^2). Frozen coordinates (residual variance zero or below the fp32
    resolution of the value, e.g. a constant bias) are excluded; count them with
    ``ensemble_frozen_count``. Raises ValueError with fewer than 3 checkpoints.
    """
    var, frozen = _residual_variance(state)
    return float(torch.log(var[~frozen]).sum())


def ensemble_frozen_count(state: dict) -> int:
    """Number of coordinates excluded from ``ensemble_log_var_sum`` as frozen."""
    return int(_residual_variance(state)[1].sum())


def ensemble_entropy(log_var_sum, n_params):
    """Diagonal-Gaussian ensemble entropy S = 0.5 * (n ln(2 pi e) + sum_i ln Var_i), in nats
    (extensive). ``n_params`` = coordinates included in ``log_var_sum`` (layer size minus the
    frozen count). Works on floats or numpy arrays."""
    return 0.5 * (n_params * LN_2PIE + log_var_sum)


def ensemble_entropy_per_param(log_var_sum, n_params):
    """``ensemble_entropy`` divided by ``n_params``: nats per parameter."""
    return ensemble_entropy(log_var_sum, n_params) / n_params


def window_log_var_sum(values, steps, chunk: int = 1 << 15) -> float:
    """``ensemble_log_var_sum`` of a window computed directly from its checkpoints' values.

    ``values``: one tensor per checkpoint of the window (same number of elements, float dtype,
    finite: the caller replaces non-finite values, as for ``ensemble_update``; weight units),
    ``steps`` their training steps. Same estimand and frozen rule as the streaming
    accumulators: sum_i ln Var_i over non-frozen coordinates, Var_i the unbiased (n_t - 2 dof)
    variance of coordinate i's residuals about its least-squares line in the step, units
    ln(weight^2). Used where the window's blocks are held anyway (the measure stage's lag
    buffer), so no per-coordinate accumulators are kept.

    Computation, per chunk of coordinates: x = values - the window's first value (fp32), then
    one small matrix product gives the residuals r = (I - H) x (H the hat matrix of the
    line fit) and the centred values c = (I - 11^T/n) x explicitly, so there is no
    sum-of-squares cancellation: the fp32 noise floor of Var_i is ~(eps |x|)^2, far below the
    frozen threshold (eps * (|ref| + rms(c)))^2. ln Var_i in fp32, summed in float64 (a
    relative error ~1e-7 per coordinate). Raises ValueError with fewer than 3 checkpoints.
    """
    n_t = len(values)
    if n_t < 3:
        raise ValueError(f"ensemble window needs >= 3 checkpoints, got {n_t}")
    flat = [v.reshape(-1) for v in values]
    tau = np.asarray(steps, dtype=np.float64) - float(steps[0])
    tau_c = tau - tau.mean()
    stt = float(tau_c @ tau_c)
    device, n = flat[0].device, flat[0].numel()
    slope_w = torch.tensor(tau_c / stt if stt > 0 else np.zeros(n_t), dtype=torch.float32, device=device)
    tau_c32 = torch.tensor(tau_c, dtype=torch.float32, device=device)
    m0 = min(chunk, n)
    x, sq = (torch.empty((n_t, m0), device=device) for _ in range(2))
    mean, slope, css, var, scale = (torch.empty(m0, device=device) for _ in range(5))
    frozen = torch.empty(m0, dtype=torch.bool, device=device)
    total = 0.0
    for start in range(0, n, chunk):  # reused buffers: no allocation inside the loop
        m = min(chunk, n - start)
        xs, sqs, ref = x[:, :m], sq[:, :m], flat[0][start : start + m].to(torch.float32)
        mean_, slope_, css_, var_, scale_, frozen_ = (b[:m] for b in (mean, slope, css, var, scale, frozen))
        for j, v in enumerate(flat):
            torch.sub(v[start : start + m], ref, out=xs[j])
        torch.mean(xs, 0, out=mean_)
        torch.mv(xs.T, slope_w, out=slope_)  # least-squares slope per coordinate
        xs -= mean_  # centred values
        torch.sum(torch.mul(xs, xs, out=sqs), 0, out=css_)
        xs.addr_(tau_c32, slope_, alpha=-1.0)  # residuals about the fitted line
        torch.sum(torch.mul(xs, xs, out=sqs), 0, out=var_).div_(n_t - 2.0)
        torch.abs(ref, out=scale_).add_(css_.div_(n_t).sqrt_()).mul_(FP32_EPS).square_()
        torch.le(var_, scale_, out=frozen_)
        total += float(var_.masked_fill_(frozen_, 1.0).log_().sum(dtype=torch.float64))
    return total
