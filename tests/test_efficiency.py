"""Known-answer tests for pipeline.estimators.efficiency."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, special

from pipeline.estimators import efficiency as eff
from pipeline.estimators.efficiency import (
    ACTIVATIONS,
    carnot_efficiency,
    engine_type,
    preactivation_scale,
    realized_efficiency,
    work_efficiency,
)

QUAD_TOL = 1e-8  # required accuracy of the quadrature (measured agreement: ~6e-11)
SCALES = [1e-3, 0.1, 1.0, 10.0, 1e3]


@pytest.mark.parametrize("scale", SCALES)
def test_homogeneous_activations_exact(scale):
    assert work_efficiency("relu", scale) == pytest.approx(0.5, abs=1e-12)
    assert work_efficiency("identity", scale) == pytest.approx(0.0, abs=1e-12)
    assert work_efficiency("linear", scale) == pytest.approx(0.0, abs=1e-12)
    a = eff.LEAKY_SLOPE
    assert work_efficiency("leaky_relu", scale) == pytest.approx(1 - (1 + a * a) / 2, abs=1e-12)


def _adaptive_reference(name: str, scale: float) -> float:
    """Independent check: scipy's adaptive QUADPACK on [-40 s, 40 s], split at the kinks and at
    +-1, +-10 (without those splits QUADPACK misses the O(1)-wide bend at s = 100 by 1e-8)."""
    phi, kinks = ACTIVATIONS[name]

    def integrand(z):
        v = phi(torch.tensor(z, dtype=torch.float64)).item()
        return v * v * math.exp(-0.5 * (z / scale) ** 2) / (scale * math.sqrt(2 * math.pi))

    lim = 40 * scale
    edges = sorted({-lim, lim, *[k for k in (0.0, -1.0, 1.0, -10.0, 10.0, *kinks) if abs(k) < lim]})
    total = sum(
        integrate.quad(integrand, a, b, epsabs=0, epsrel=1e-13, limit=2000)[0]
        for a, b in zip(edges[:-1], edges[1:])
    )
    return 1 - total / scale**2


@pytest.mark.parametrize(
    "name", ["gelu", "gelu_new", "silu", "tanh", "elu", "selu", "softplus", "mish", "relu6"]
)
@pytest.mark.parametrize("scale", [1e-2, 1.0, 10.0, 100.0])
def test_matches_adaptive_quadrature(name, scale):
    assert work_efficiency(name, scale) == pytest.approx(
        _adaptive_reference(name, scale), abs=QUAD_TOL
    )


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_smooth_case_matches_gauss_hermite(scale):
    """For a smooth activation at moderate scale, probabilists' Gauss-Hermite (200 nodes)
    converges to machine precision: the composite rule must agree to 1e-12."""
    x, w = np.polynomial.hermite_e.hermegauss(200)
    v = F.gelu(torch.from_numpy(scale * x)).numpy()
    gh = 1 - np.sum(w * v * v) / np.sum(w) / scale**2
    assert work_efficiency("gelu", scale) == pytest.approx(gh, abs=1e-12)


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_gelu_monte_carlo(scale):
    """10^6 draws of z ~ N(0, s^2): eta_MC = 1 - mean(gelu(z)^2)/s^2 within 5 standard errors."""
    z = torch.randn(10**6, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * scale
    r = F.gelu(z) ** 2 / scale**2
    mc, se = 1 - r.mean().item(), r.std().item() / math.sqrt(r.numel())
    assert abs(work_efficiency("gelu", scale) - mc) < 5 * se


def test_small_and_large_scale_closed_forms():
    # gelu(z) = z Phi(z) = z/2 + z^2/sqrt(2 pi) + O(z^4): eta = 3/4 - 3 s^2/(2 pi) + O(s^4)
    s = 1e-2
    assert work_efficiency("gelu", s) == pytest.approx(0.75 - 3 * s * s / (2 * math.pi), abs=1e-7)
    # tanh^2 z = z^2 - 2 z^4/3 + 17 z^6/45 - ...: eta = 2 s^2 - (17/3) s^4 + O(s^6) -> 0
    s = 1e-3
    assert work_efficiency("tanh", s) == pytest.approx(2 * s**2 - 17 / 3 * s**4, abs=1e-15)
    # large s: E[tanh^2] = 1 - E[sech^2] ~ 1 - 2/(s sqrt(2 pi)) -> eta -> 1
    s = 1e3
    expected = 1 - (1 - 2 / (s * math.sqrt(2 * math.pi))) / s**2
    assert work_efficiency("tanh", s) == pytest.approx(expected, abs=1e-12)
    # large s: gelu^2 - relu^2 is localised near 0, so eta = 1/2 - C / (s^3 sqrt(2 pi)) + O(s^-5)
    # with C = int (gelu(z)^2 - relu(z)^2) dz
    ndtr = special.ndtr
    c = (
        integrate.quad(lambda z: z * z * (ndtr(z) ** 2 - 1), 0, np.inf, epsabs=1e-14)[0]
        + integrate.quad(lambda z: z * z * ndtr(z) ** 2, -np.inf, 0, epsabs=1e-14)[0]
    )
    for s in [100.0, 1000.0]:
        assert work_efficiency("gelu", s) == pytest.approx(
            0.5 - c / (s**3 * math.sqrt(2 * math.pi)), abs=1e-10
        )
    etas = [work_efficiency("tanh", s) for s in [1e-3, 1e-1, 1, 10, 1e3]]
    assert all(b > a for a, b in zip(etas, etas[1:]))  # monotone from ~0 to ~1
    # selu is self-normalising: E[selu(z)^2] = 1 at s = 1, so eta(1) ~ 0
    assert abs(work_efficiency("selu", 1.0)) < 1e-3


def test_engine_types():
    for name in ["relu", "leaky_relu", "identity", "linear"]:
        assert engine_type(name) == "scale-free", name
    for name in [
        "gelu",
        "gelu_new",
        "silu",
        "tanh",
        "sigmoid",
        "softplus",
        "mish",
        "elu",
        "selu",
        "relu6",
    ]:
        assert engine_type(name) == "scale-dependent", name


def test_engine_type_is_decided_numerically(monkeypatch):
    """An activation not in the original table is classified by its behaviour: |z| and 3 relu
    are positively homogeneous (scale-free); relu clipped at 1 is not."""
    monkeypatch.setitem(ACTIVATIONS, "test_abs", (torch.abs, (0.0,)))
    monkeypatch.setitem(ACTIVATIONS, "test_relu3", (lambda z: 3 * F.relu(z), (0.0,)))
    monkeypatch.setitem(ACTIVATIONS, "test_relu_clip1", (lambda z: z.clamp(0.0, 1.0), (0.0, 1.0)))
    assert engine_type("test_abs") == "scale-free"
    assert engine_type("test_relu3") == "scale-free"
    assert work_efficiency("test_relu3", 2.0) == pytest.approx(1 - 9 / 2, abs=1e-12)
    assert engine_type("test_relu_clip1") == "scale-dependent"


def test_unknown_activation_and_bad_scale():
    with pytest.raises(ValueError, match="known: .*gelu.*relu"):
        work_efficiency("not_an_activation", 1.0)
    assert work_efficiency("GELU", 1.0) == work_efficiency("gelu", 1.0)
    for bad in [0.0, -1.0, float("nan"), float("inf")]:
        assert math.isnan(work_efficiency("relu", bad))


def test_preactivation_scale_recovers_measured_std():
    """Independent weights (rms 0.05) and inputs (rms 2, uniform): std of W x matches s
    within 2% (8e6 pre-activations; the weights' own sample rms is used)."""
    g = torch.Generator().manual_seed(5)
    fan_in = 256
    w = torch.randn(2000, fan_in, generator=g, dtype=torch.float64) * 0.05
    x = (torch.rand(fan_in, 4000, generator=g, dtype=torch.float64) * 2 - 1) * 2 * math.sqrt(3)
    s = preactivation_scale(w.pow(2).mean().sqrt().item(), fan_in, x.pow(2).mean().sqrt().item())
    assert s == pytest.approx(0.05 * 16 * 2, rel=0.01)
    assert (w @ x).std().item() == pytest.approx(s, rel=0.02)
    assert preactivation_scale(0.1, 100) == pytest.approx(1.0)
    assert isinstance(preactivation_scale(0.1, 100), float)
    # vectorised as thermo.py uses it: (step, layer) rms against per-layer fan_in
    rms = np.array([[0.1, 0.2, np.nan], [0.05, -1.0, 0.3]])
    out = preactivation_scale(rms, np.array([100, 25, 4])[None, :])
    np.testing.assert_allclose(out[0, :2], [1.0, 1.0])
    np.testing.assert_allclose(out[1, 0], 0.5)
    assert np.isnan(out[0, 2]) and np.isnan(out[1, 1])
    assert math.isnan(preactivation_scale(0.1, 0))


def test_carnot_efficiency():
    assert carnot_efficiency(1.0, 4.0) == pytest.approx(0.75)
    assert isinstance(carnot_efficiency(1.0, 4.0), float)
    out = carnot_efficiency(
        np.array([0.0, 1.0, 1.0, 1.0, np.nan, 1.0]), np.array([2.0, 2.0, 0.0, -1.0, 2.0, np.inf])
    )
    np.testing.assert_allclose(out[:2], [1.0, 0.5])
    assert np.all(np.isnan(out[2:]))
    np.testing.assert_allclose(carnot_efficiency(np.array([1.0, 2.0]), 4.0), [0.75, 0.5])


def test_realized_efficiency():
    assert realized_efficiency(3.0, 1.0) == pytest.approx(0.75)
    out = realized_efficiency(
        np.array([1.0, 0.0, 0.0, 2.0, 1.0, np.nan]), np.array([1.0, 5.0, 0.0, -1.0, -1.0, 1.0])
    )
    np.testing.assert_allclose(out[:4], [0.5, 0.0, np.nan, 2.0])
    assert np.isnan(out[2]) and np.isnan(out[4]) and np.isnan(out[5])
    # cancellation at the 1e-12 relative level counts as a zero denominator
    assert math.isnan(realized_efficiency(1.0, -1.0 + 1e-14))
