"""Known-answer tests for pipeline.estimators.entropy.

Tolerance: 0.01 nats at 10^6 values (METHODS.md quantity 1, Validation). The estimator's sampling
standard deviation at n = 10^6 is ~7e-4 (Gaussian) / ~1.2e-3 (Laplace) / ~2e-5 (uniform),
so 0.01 is > 8 sigma; a systematic bias of more than ~0.005 would still be caught.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.estimators.entropy import (
    differential_entropy,
    entropy_subsample_indices,
    gaussian_entropy,
)

N = 10**6
TOL = 0.01
SCALES = [1e-4, 1.0, 10.0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normal(s: float, seed: int, n: int = N) -> torch.Tensor:
    return (torch.randn(n, generator=_gen(seed), dtype=torch.float64) * s).float()


def _uniform(a: float, seed: int, n: int = N) -> torch.Tensor:
    return ((torch.rand(n, generator=_gen(seed), dtype=torch.float64) * 2 - 1) * a).float()


def _laplace(b: float, seed: int) -> torch.Tensor:
    u = torch.rand(N, generator=_gen(seed), dtype=torch.float64) - 0.5
    return (-b * torch.sign(u) * torch.log1p(-2 * u.abs())).float()  # inverse CDF


CASES = [
    ("normal", _normal, lambda s: 0.5 * math.log(2 * math.pi * math.e * s * s)),
    ("uniform", _uniform, lambda a: math.log(2 * a)),
    ("laplace", _laplace, lambda b: 1 + math.log(2 * b)),
]


@pytest.mark.parametrize("name,draw,truth", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("scale", SCALES)
def test_known_distributions(name, draw, truth, scale):
    x = draw(scale, seed=100 + 10 * SCALES.index(scale) + [c[0] for c in CASES].index(name))
    err = differential_entropy(x) - truth(scale)
    assert abs(err) < TOL, f"{name} scale={scale}: error {err:.2e} nats"


def test_scale_equivariance_and_shift_invariance():
    x = _normal(1.0, seed=3, n=10**5).double()
    h = differential_entropy(x)
    for c in [1e-4, 0.37, 10.0]:
        assert differential_entropy(c * x) == pytest.approx(h + math.log(c), abs=1e-9)
    assert differential_entropy(x + 5.0) == pytest.approx(h, abs=1e-6)


def test_non_finite_values_ignored():
    x = _normal(1.0, seed=4, n=10**5)
    dirty = torch.cat([x, torch.tensor([float("nan"), float("inf"), -float("inf")])])
    assert differential_entropy(dirty) == differential_entropy(x)


def test_degenerate_inputs_give_nan():
    assert math.isnan(differential_entropy(torch.ones(1000)))  # constant: zero spread
    assert math.isnan(differential_entropy(torch.randn(15)))  # too few values
    assert math.isnan(differential_entropy(torch.full((100,), float("nan"))))
    # mostly one value (e.g. zero-init bias with a few updated entries): effectively discrete
    x = torch.zeros(1000)
    x[:10] = torch.randn(10, generator=_gen(5))
    assert math.isnan(differential_entropy(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantised_ties_stay_finite_and_close(dtype):
    """bf16 keeps 8 mantissa bits: ~1400 exact repeats per value near the mode at 10^6 draws.
    Zero spacings must not give -inf; the estimate stays near the continuous truth (the
    quantisation step is ~0.4% of the value; measured error ~0.002).
    """
    x = _normal(0.02, seed=6).to(dtype)
    truth = 0.5 * math.log(2 * math.pi * math.e * 0.02**2)
    h = differential_entropy(x)
    assert math.isfinite(h)
    assert abs(h - truth) < TOL, f"{dtype}: error {h - truth:.2e}"


def test_small_sample_uniform_unbiased():
    """The digamma correction makes the estimator exactly unbiased for a uniform density at any
    n: mean over 400 samples of n=64 within 4 standard errors of ln(2)."""
    g = _gen(7)
    est = np.array(
        [
            differential_entropy(torch.rand(64, generator=g, dtype=torch.float64) * 2 - 1)
            for _ in range(400)
        ]
    )
    se = est.std(ddof=1) / math.sqrt(est.size)
    assert abs(est.mean() - math.log(2)) < 4 * se


def test_gaussian_entropy_float_and_array():
    assert gaussian_entropy(1.0) == pytest.approx(0.5 * math.log(2 * math.pi * math.e))
    assert isinstance(gaussian_entropy(2.0), float)
    v = np.array([1e-8, 1.0, 4.0])
    out = gaussian_entropy(v)
    assert out.shape == (3,)
    np.testing.assert_allclose(out, 0.5 * np.log(2 * np.pi * np.e * v))
    # the Gaussian is the max-entropy law at fixed variance: non-Gaussianity >= 0
    u = _uniform(1.0, seed=8, n=10**5)
    assert gaussian_entropy(float(u.double().var())) - differential_entropy(u) > 0.1


def test_subsample_indices_deterministic_and_uniform():
    a = entropy_subsample_indices(10**7, 1000, seed=1)
    b = entropy_subsample_indices(10**7, 1000, seed=1)
    c = entropy_subsample_indices(10**7, 1000, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and a.numel() == 1000 and torch.unique(a).numel() == 1000
    assert int(a.min()) >= 0 and int(a.max()) < 10**7
    assert torch.all(a[1:] > a[:-1])
    # uniform over [0, n): mean index within 5 standard errors of (n-1)/2
    big = entropy_subsample_indices(10**6, 10**4, seed=3).double()
    se = 10**6 / math.sqrt(12 * 10**4)
    assert abs(big.mean().item() - (10**6 - 1) / 2) < 5 * se
    assert torch.equal(entropy_subsample_indices(50, 80, seed=0), torch.arange(50))


def test_subsample_entropy_matches_full():
    """The streaming measurement estimates entropy on a fixed subsample: at k = 10^5 the
    estimate is within 0.02 nats of the truth (sampling sd ~ 2e-3)."""
    x = _normal(0.5, seed=9)
    idx = entropy_subsample_indices(x.numel(), 10**5, seed=0)
    truth = 0.5 * math.log(2 * math.pi * math.e * 0.25)
    assert abs(differential_entropy(x[idx]) - truth) < 0.02


def test_ties_move_inside_their_cells_only():
    """De-quantised ties stay inside their own cell (halfway to the neighbouring distinct
    values; the outer cells mirrored), singletons do not move, and the result stays sorted."""
    from pipeline.estimators.entropy import _spread_ties

    x = np.array([0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 3.5, 4.0, 4.0])
    out, longest = _spread_ties(x)
    assert longest == 3
    assert np.all(np.diff(out) >= 0)
    assert out[3] == 1.0 and out[6] == 3.5  # singletons
    cells = [(-0.5, 0.5, slice(0, 3)), (1.5, 2.75, slice(4, 6)), (3.75, 4.25, slice(7, 9))]
    for lo, hi, where in cells:
        assert np.all((out[where] >= lo) & (out[where] <= hi)), (lo, hi, out[where])
    assert np.array_equal(_spread_ties(out)[0], out)  # no ties left: unchanged
