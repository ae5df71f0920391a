"""Known-answer tests for pipeline.estimators.spectral.

Reference: an independent numpy transcription of WeightWatcher's formulas (RMT_Util.py
`matrix_rank`, `matrix_entropy`, `stable_rank`, called from `apply_norm_metrics` with
N = max(W.shape)) on numpy.linalg.svd singular values. Tolerance: rtol 1e-6 between the
streamed Gram path, the direct SVD path and the reference (the measured differences are ~1e-15).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.estimators.spectral import (
    gram_update,
    singular_values,
    singular_values_from_gram,
    spectral_metrics,
)

RTOL = 1e-6


def ww_reference(w: np.ndarray) -> tuple[float, float]:
    """WeightWatcher's matrix_entropy and stable_rank, written out with numpy."""
    sv = np.linalg.svd(w, compute_uv=False)
    n_big = max(w.shape)
    tol = sv.max() * n_big * np.finfo(sv.dtype).eps
    rank = np.count_nonzero(sv > tol)
    evals = sv * sv
    p = evals / evals.sum()
    p = p[p > 0]
    entropy = -np.sum(p * np.log(p)) / np.log(rank if rank != 1 else 1.000001)
    return float(entropy), float(evals.sum() / evals.max())


def _matrices():
    rng = np.random.default_rng(0)
    yield "gaussian", rng.standard_normal((120, 80)) * 0.05
    yield "gaussian_wide", rng.standard_normal((40, 90))
    yield "low_rank_3", rng.standard_normal((100, 3)) @ rng.standard_normal((3, 60))
    yield "heavy_tailed", rng.standard_t(df=1.5, size=(150, 70))
    yield "pareto", rng.pareto(1.2, size=(90, 90)) * rng.choice([-1, 1], size=(90, 90))


MATRICES = list(_matrices())


def _gram_path(w: torch.Tensor, block_rows: int = 17) -> torch.Tensor:
    gram = None
    for block in w.split(block_rows):
        gram = gram_update(gram, block)
    return singular_values_from_gram(gram)


@pytest.mark.parametrize("name,w", MATRICES, ids=[m[0] for m in MATRICES])
def test_gram_and_svd_paths_match_weightwatcher(name, w):
    ref = ww_reference(w)
    t = torch.from_numpy(w)
    direct = spectral_metrics(singular_values(t), *w.shape)
    streamed = spectral_metrics(_gram_path(t), *w.shape)
    np.testing.assert_allclose(direct, ref, rtol=RTOL, err_msg=f"{name}: direct SVD vs WW")
    np.testing.assert_allclose(streamed, ref, rtol=RTOL, err_msg=f"{name}: Gram path vs WW")


def test_low_rank_rank_is_three():
    """The normaliser is ln(rank): for a rank-3 matrix it must be ln 3, not ln 60."""
    w = dict(MATRICES)["low_rank_3"]
    s = _gram_path(torch.from_numpy(w))
    assert int((s > 0).sum()) == 3
    p = (s[:3] ** 2 / (s[:3] ** 2).sum()).numpy()
    expected = -np.sum(p * np.log(p)) / math.log(3)
    assert spectral_metrics(s, *w.shape)[0] == pytest.approx(expected, rel=1e-12)


def test_known_answers():
    # orthogonal matrix: all s_i = 1 -> entropy 1, stable rank n
    q, _ = torch.linalg.qr(
        torch.randn(50, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    ent, sr = spectral_metrics(singular_values(q), 50, 50)
    assert ent == pytest.approx(1.0, abs=1e-12) and sr == pytest.approx(50.0, rel=1e-12)
    # rank 1: entropy 0, stable rank 1
    u = torch.arange(1.0, 11.0, dtype=torch.float64)
    ent, sr = spectral_metrics(singular_values(torch.outer(u, u[:7])), 10, 7)
    assert ent == pytest.approx(0.0, abs=1e-12) and sr == pytest.approx(1.0, rel=1e-12)
    # diag(2, 1): p = (0.8, 0.2), entropy = H(p)/ln 2, stable rank = 5/4
    ent, sr = spectral_metrics(torch.tensor([2.0, 1.0], dtype=torch.float64), 2, 2)
    assert ent == pytest.approx(
        -(0.8 * math.log(0.8) + 0.2 * math.log(0.2)) / math.log(2), rel=1e-12
    )
    assert sr == pytest.approx(1.25, rel=1e-12)


def test_degenerate_spectra_give_nan():
    for s in [torch.zeros(5), torch.tensor([]), torch.tensor([1.0, float("nan")])]:
        assert all(math.isnan(v) for v in spectral_metrics(s, 5, 5))


def test_fp32_blocks_and_conv_reshape():
    """The pipeline streams fp32 row blocks of >2-D tensors: the Gram path on a 4-D conv
    kernel equals the WW reference on its (out, in*kh*kw) float64 view."""
    w4 = torch.randn(32, 8, 3, 3, generator=torch.Generator().manual_seed(2))
    ref = ww_reference(w4.reshape(32, -1).double().numpy())
    gram = None
    for block in w4.split(5):  # blocks of rows keep their trailing dims
        gram = gram_update(gram, block)
    assert gram.dtype == torch.float64 and gram.shape == (72, 72)
    np.testing.assert_allclose(
        spectral_metrics(singular_values_from_gram(gram), 32, 72), ref, rtol=RTOL
    )
    np.testing.assert_allclose(spectral_metrics(singular_values(w4), 32, 72), ref, rtol=RTOL)


def test_singular_values_sorted_descending():
    w = torch.randn(30, 20, generator=torch.Generator().manual_seed(3))
    for s in (singular_values(w), _gram_path(w)):
        assert s.dtype == torch.float64 and torch.all(s[:-1] >= s[1:])
    torch.testing.assert_close(_gram_path(w), singular_values(w), rtol=1e-10, atol=1e-12)


def test_vector_rejected():
    with pytest.raises(ValueError):
        singular_values(torch.ones(5))


def test_singular_values_via_gram_matches_svd_and_falls_back_when_unresolved():
    """Random wide matrix: the Gram path of the smaller side equals svdvals (rtol 1e-10). A
    rank-3 product stored in fp32 has rounding singular values ~1e-7 max(s), below the Gram
    floor: the function falls back to svdvals so the rank count (40) is WeightWatcher's."""
    from pipeline.estimators.spectral import singular_values_via_gram

    g = torch.Generator().manual_seed(7)
    wide = torch.randn(30, 90, generator=g)
    torch.testing.assert_close(
        singular_values_via_gram(wide), singular_values(wide), rtol=1e-10, atol=1e-12
    )
    low = (
        torch.randn(48, 3, generator=g, dtype=torch.float64)
        @ torch.randn(3, 40, generator=g, dtype=torch.float64)
    ).float()
    s = singular_values_via_gram(low)
    torch.testing.assert_close(s, singular_values(low), rtol=1e-10, atol=1e-12)
    assert int((s > s.max() * 48 * torch.finfo(torch.float64).eps).sum()) == 40
