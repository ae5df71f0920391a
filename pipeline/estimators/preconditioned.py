"""Which step size and which displacement offset an optimizer implies (METHODS.md 3b).

For ``d theta = -eta P^-1 (g + xi)`` (P diagonal; Adam: sqrt(v_hat) + eps, SGD: 1) on a
quadratic, the stationary discrete-time Lyapunov equation gives exactly
``E[d theta^T P d theta] = 2 eta tr(H Sigma) = 4 eta E[L - L*]``, so the layer temperature is
``T_l = D_P,l / (2 eta n_l)`` with D_P the diffusive slope of the preconditioned squared
displacement (``displacement.temperature_from_diffusivity`` with ``eta`` in place of lr).

Momentum turns each update into a filtered sum ``u_t = sum_j c_j g_{t-j}``:
  - heavy ball ``v = mu v + g; theta -= lr v``: c_j = mu^j, long-lag step ``eta = lr/(1-mu)``;
  - Nesterov ``theta -= lr (g + mu v)``: c_0 = 1 + mu, c_j = mu^(j+1), ``eta = lr/(1-mu)``;
  - Adam's first moment (EMA): c_j = (1-beta1) beta1^j, ``eta = lr`` (sum c_j = 1).
Over lags much longer than the filter the displacement diffuses with that eta, and its
variance is short by a constant number of steps' worth (``momentum_offset_steps``; Adam and
heavy ball at 0.9: 2 beta/((1+beta)(1-beta)) = 9.47 steps). The diffusivity estimator takes
that offset as a known term (``diffusivity_from_band(offset_steps=...)``), so it does not bias D.
"""

from __future__ import annotations

import numpy as np

_TERMS = 20_000  # filter taps summed (beta^20000 is negligible for beta <= 0.999)


def momentum_filter(kind: str, momentum: float) -> np.ndarray:
    """Coefficients c_j of the update as a filter of the gradients (see module docstring)."""
    mu = float(momentum)
    j = np.arange(_TERMS, dtype=np.float64)
    if kind in ("adam", "adamw"):
        return (1.0 - mu) * mu**j
    if kind == "nesterov":
        c = mu ** (j + 1)
        c[0] += 1.0
        return c
    if kind in ("sgd", "sgd_momentum"):
        return mu**j
    raise ValueError(f"no momentum filter for optimizer {kind!r}")


def momentum_offset_steps(kind: str, momentum: float) -> float:
    """Steps' worth by which momentum shortens the long-lag squared displacement.

    With ``C = sum c_j`` and tails ``t_m = sum_{j>=m} c_j``, the variance of the sum of tau
    filtered white-noise updates is ``C^2 tau - 2 C sum_m t_m + 2 sum_m t_m^2`` for tau much
    longer than the filter (interior terms, minus the deficit at the window's end, plus the
    carry-in from before it); returned is ``(2 C sum t_m - 2 sum t_m^2) / C^2`` (>= 0; 0
    without momentum). Exact for stationary gradient noise; the drift part is not filtered
    differently and is removed by the detrending.
    """
    if not momentum:
        return 0.0
    c = momentum_filter(kind, momentum)
    total = c.sum()
    tails = total - np.cumsum(c)  # t_m for m = 1, 2, ...
    return float((2 * total * tails.sum() - 2 * np.dot(tails, tails)) / total**2)


def effective_step(kind: str, lr, momentum) -> np.ndarray:
    """Long-lag step size eta: lr for Adam/AdamW and plain SGD, lr / (1 - mu) for heavy ball
    and Nesterov (weight^2/loss for SGD; for Adam the step in P-scaled units)."""
    lr = np.asarray(lr, dtype=np.float64)
    if kind in ("sgd_momentum", "nesterov"):
        return lr / (1.0 - np.asarray(momentum, dtype=np.float64))
    return lr


def clip_fraction(grad_norms, max_grad_norm: float | None) -> float:
    """Fraction of logged gradient norms (before clipping) above ``max_grad_norm``: the share
    of updates whose gradient was rescaled (NaN when unknown). SGD's step is then smaller
    than lr; Adam's normalised step is nearly invariant to a rescaled gradient."""
    norms = np.asarray(grad_norms, dtype=np.float64)
    if not max_grad_norm or norms.size == 0:
        return float("nan")
    return float(np.mean(norms > max_grad_norm))


MAX_CLIP_FRACTION = 0.1  # SGD: clipped at more logged steps than this -> T refused


def clip_refusal(clipped: float, max_grad_norm: float | None) -> str:
    """Why an SGD-family run's T is refused for gradient clipping ('' when it is not):
    ``clipped`` (``clip_fraction``) above MAX_CLIP_FRACTION means the step is not lr there."""
    if np.isfinite(clipped) and clipped > MAX_CLIP_FRACTION:
        return (
            f"gradient clipped (grad_norm > {max_grad_norm}) at {clipped:.0%} of the logged "
            "steps: the SGD step size is not lr there (the log holds the norm before clipping; "
            "set thermo.max_grad_norm (params.yaml, --params) to the run's own threshold, "
            "null if it never clipped)"
        )
    return ""
