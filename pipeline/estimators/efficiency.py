"""Heat-engine efficiencies of layers (Zhang 2024, arXiv:2404.13218; METHODS.md quantity 8).

(a) work_efficiency: the activation's work efficiency 1 - E[phi(z)^2] / E[z^2], z ~ N(0, s^2);
(b) carnot_efficiency: the Carnot bound 1 - T_cold / T_hot between two layers;
(c) realized_efficiency: work / (work + heat) from the first-law split of a loss change.
All are dimensionless. See METHODS.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]


def _gelu_tanh(z: torch.Tensor) -> torch.Tensor:
    return F.gelu(z, approximate="tanh")


def _quick_gelu(z: torch.Tensor) -> torch.Tensor:
    return z * torch.sigmoid(1.702 * z)


def _leaky_relu(z: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(z, negative_slope=LEAKY_SLOPE)


LEAKY_SLOPE = 0.01
"""Negative slope of leaky_relu (PyTorch's default)."""

# name -> (function on float64 tensors, points where it is not smooth)
ACTIVATIONS: dict[str, tuple[Activation, tuple[float, ...]]] = {
    "identity": (lambda z: z, ()),
    "linear": (lambda z: z, ()),
    "relu": (F.relu, (0.0,)),
    "relu6": (F.relu6, (0.0, 6.0)),
    "leaky_relu": (_leaky_relu, (0.0,)),
    "elu": (F.elu, (0.0,)),
    "selu": (F.selu, (0.0,)),
    "gelu": (F.gelu, ()),  # exact: z * Phi(z) (erf form)
    "gelu_new": (_gelu_tanh, ()),  # tanh approximation
    "gelu_pytorch_tanh": (_gelu_tanh, ()),
    "gelu_fast": (_gelu_tanh, ()),
    "quick_gelu": (_quick_gelu, ()),
    "silu": (F.silu, ()),
    "swish": (F.silu, ()),
    "tanh": (torch.tanh, ()),
    "sigmoid": (torch.sigmoid, ()),
    "softplus": (F.softplus, (20.0,)),  # PyTorch switches to the identity above threshold 20
    "mish": (F.mish, ()),
}

_SPAN = 16.0  # integrate z over [-16 s, 16 s]: the Gaussian mass beyond is < 1e-56
_NODES = 24  # Gauss-Legendre nodes per panel
_FEATURE_SCALES = tuple(2.0**k for k in range(-3, 7))  # 1/8 .. 64: where activations bend


def _activation(name: str) -> tuple[Activation, tuple[float, ...]]:
    key = name.strip().lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; known: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[key]


def _panels(scale: float, kinks: tuple[float, ...]) -> np.ndarray:
    """Breakpoints on [-16 s, 16 s]: every standard deviation (resolves the Gaussian), the
    activation's kinks, and +-2^k for k = -3..6 (resolves its O(1)-wide bends at any s)."""
    lim = _SPAN * scale
    pts = [np.linspace(-lim, lim, 2 * int(_SPAN) + 1), np.array([0.0, *kinks])]
    pts.append(np.array([sign * f for f in _FEATURE_SCALES for sign in (-1.0, 1.0)]))
    pts = np.concatenate(pts)
    return np.unique(pts[(pts >= -lim) & (pts <= lim)])


def _second_moment(phi: Activation, kinks: tuple[float, ...], scale: float) -> float:
    """E[phi(z)^2] for z ~ N(0, scale^2), composite Gauss-Legendre quadrature in z."""
    edges = _panels(scale, kinks)
    x, w = np.polynomial.legendre.leggauss(_NODES)
    half = np.diff(edges)[:, None] / 2
    z = (edges[:-1, None] + edges[1:, None]) / 2 + half * x[None, :]
    weights = half * w[None, :] * np.exp(-0.5 * (z / scale) ** 2) / (scale * math.sqrt(2 * math.pi))
    values = phi(torch.from_numpy(z)).numpy()
    return float(np.sum(weights * values * values))


def work_efficiency(activation: str, scale: float) -> float:
    """Zhang's work efficiency eta = 1 - E[phi(z)^2] / E[z^2] of an activation (dimensionless).

    z ~ N(0, scale^2) is the pre-activation (E[z^2] = scale^2); the layer "absorbs" energy
    E[z^2] and passes on E[phi(z)^2]. ReLU: 1/2 at any scale; identity: 0; leaky ReLU with
    slope a: 1 - (1 + a^2)/2; tanh: -> 0 as scale -> 0 and -> 1 as scale -> inf. Activations
    with phi(0) != 0 (sigmoid, softplus) give eta -> -inf as scale -> 0: E[phi^2] stays
    finite while E[z^2] -> 0; the value is returned as is.

    Quadrature: E[phi(z)^2] is integrated by composite Gauss-Legendre (24 nodes per panel) on
    [-16 scale, 16 scale] with panel edges at every standard deviation, at the activation's
    kinks (0 for ReLU-like, ELU/SELU; 6 for ReLU6; 20 for PyTorch softplus) and at +-2^k,
    k = -3..6, where the smooth activations bend. Each panel's integrand is smooth, so the
    error is ~1e-13 relative at every scale in 1e-3..1e3 (tested against an adaptive
    integrator). Plain Gauss-Hermite was rejected: it converges only algebraically for kinks
    inside the range (ELU at s = 1: error 1e-9 needs ~16k nodes) and needs ~s^2 nodes to
    resolve the O(1)-wide bend of tanh/GELU at large s (measured). Functions are PyTorch's
    own (float64), so gelu is the exact erf form and gelu_new/gelu_pytorch_tanh/gelu_fast the
    tanh approximation, as in the models.

    Args:
        activation: name (case-insensitive), one of ACTIVATIONS; else ValueError listing them.
        scale: pre-activation standard deviation s. NaN is returned unless 0 < s < inf
            (s = 0, e.g. a zero-initialised weight, makes the ratio 0/0).
    """
    _activation(activation)
    if not (math.isfinite(scale) and scale > 0):
        return float("nan")
    return _cached_efficiency(activation.strip().lower(), float(scale))


@lru_cache(maxsize=4096)
def _cached_efficiency(key: str, scale: float) -> float:
    phi, kinks = ACTIVATIONS[key]
    return 1.0 - _second_moment(phi, kinks, scale) / scale**2


ENGINE_PROBE_SCALES = (0.1, 1.0, 10.0)
ENGINE_TOLERANCE = 1e-9


def engine_type(activation: str) -> str:
    """ "scale-free" when the work efficiency does not depend on the pre-activation scale
    (positively homogeneous phi(c z) = c phi(z): relu, leaky_relu, identity), else
    "scale-dependent" (saturating/curved activations: tanh, gelu, silu, ...).

    Decided numerically, not from a list: efficiencies at scales 0.1, 1 and 10 all equal
    within 1e-9 -> "scale-free".
    """
    etas = [work_efficiency(activation, s) for s in ENGINE_PROBE_SCALES]
    return "scale-free" if max(etas) - min(etas) <= ENGINE_TOLERANCE else "scale-dependent"


def preactivation_scale(weight_rms, fan_in, input_rms=1.0):
    """Pre-activation standard deviation s = weight_rms * sqrt(fan_in) * input_rms.

    Assumption: z = sum_{j=1}^{fan_in} w_j x_j with weights independent of the inputs and of
    each other, zero-mean weights of mean square weight_rms^2 (or zero-mean inputs), and
    inputs of mean square input_rms^2; then E[z^2] = fan_in * weight_rms^2 * input_rms^2.
    Without data, input_rms = 1 (the normalised-input convention of variance-preserving
    initialisation). Biases and correlations between weights and inputs (which training
    creates) are ignored. Units: the unit of the pre-activation (input units x weight units).

    numpy-vectorised (arguments broadcast; scalars give a float). NaN where weight_rms < 0,
    input_rms < 0, fan_in < 1 or an input is not finite.
    """
    w = np.asarray(weight_rms, dtype=np.float64)
    n = np.asarray(fan_in, dtype=np.float64)
    x = np.asarray(input_rms, dtype=np.float64)
    ok = np.isfinite(w) & np.isfinite(n) & np.isfinite(x) & (w >= 0) & (x >= 0) & (n >= 1)
    out = np.where(ok, w * np.sqrt(np.where(ok, n, 1.0)) * x, np.nan)
    return float(out) if out.ndim == 0 else out


def carnot_efficiency(t_cold, t_hot):
    """Carnot bound 1 - T_cold / T_hot between a cold and a hot reservoir (dimensionless).

    Temperatures in the same units (loss units here). NaN where t_hot <= 0 or either
    temperature is not finite. numpy-vectorised: arrays broadcast; scalars give a float.
    """
    tc = np.asarray(t_cold, dtype=np.float64)
    th = np.asarray(t_hot, dtype=np.float64)
    ok = np.isfinite(tc) & np.isfinite(th) & (th > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(ok, 1.0 - tc / np.where(ok, th, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


REALIZED_REL_TOL = 1e-12
"""|work + heat| below this fraction of |work| + |heat| counts as a zero denominator."""


def released_heat(t_start, t_end, n_params, valley_fraction: float = 1.0):
    """Heat a layer releases between two states: (f n / 2) (T_start - T_end), loss units.

    Equipartition: each of the f n valley directions stores T/2 of thermal loss, so cooling
    from T_start to T_end releases that difference (negative when the layer heats up). The
    net first-law heat of the interval, not a total variation of a noisy T. f
    (``valley_fraction``) is not identifiable from displacements; 1 is an upper bound
    (METHODS.md 6). numpy-vectorised.
    """
    t0 = np.asarray(t_start, dtype=np.float64)
    t1 = np.asarray(t_end, dtype=np.float64)
    out = 0.5 * valley_fraction * np.asarray(n_params, dtype=np.float64) * (t0 - t1)
    return float(out) if out.ndim == 0 else out


def realized_efficiency(work, heat):
    """Realized efficiency work / (work + heat) of an interval (dimensionless).

    Sign convention: `work` and `heat` are the magnitudes of the loss decrease attributed to
    the drift (systematic descent) and to the fluctuation part of the motion in the first-law
    split (METHODS.md quantity 6), both counted positive when they lower the loss; with both
    >= 0 the result lies in [0, 1]. A fluctuation that raises the loss enters as heat < 0 and
    can push the ratio above 1. NaN where the denominator is ~0 (|work + heat| <=
    1e-12 (|work| + |heat|), including 0/0) or an input is not finite. numpy-vectorised.
    """
    w = np.asarray(work, dtype=np.float64)
    h = np.asarray(heat, dtype=np.float64)
    denom = w + h
    ok = (
        np.isfinite(w)
        & np.isfinite(h)
        & (np.abs(denom) > REALIZED_REL_TOL * (np.abs(w) + np.abs(h)))
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(ok, w / np.where(ok, denom, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out
