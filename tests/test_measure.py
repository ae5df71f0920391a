"""The streaming measurement (pipeline.measure) against direct computations on the same files.

The measure stage computes the distance band from a ring of increments and the ensemble window
from the same ring (``_BandTracker``), walking each row block in cache-sized slices. These tests
write real safetensors series and compare ``measure_block`` with the plain definitions:
``sq_distance_band`` on the values and ``window_statistics`` on the values, whole block at once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoint_factory import write_random_walk

from pipeline.core.manifest import TensorInfo
from pipeline.estimators.displacement import band_from_increment_dots, sq_distance_band
from pipeline.estimators.ensemble import increment_window_statistics, window_statistics
from pipeline.measure.kernel import BlockTask, measure_block
from pipeline.settings import MeasureSettings

ROWS, COLS, N_CKPT = 96, 40, 19


def _series(tmp_path, nan_at=None, seed=0):
    """N_CKPT checkpoints of one (ROWS, COLS) random walk (``write_random_walk``)."""
    return write_random_walk(tmp_path, (ROWS, COLS), N_CKPT, nan_at, seed)


def _direct_band(values, max_lag):
    band = np.full((len(values), max_lag), np.nan)
    for t in range(1, len(values)):
        prev = [values[t - k].reshape(-1) for k in range(1, min(t, max_lag) + 1)]
        band[t, : len(prev)] = sq_distance_band(values[t].reshape(-1), prev)
    return band


def _task(files, steps, resume_from=0, start=0, stop=ROWS):
    return BlockTask(
        "run", TensorInfo("w", (ROWS, COLS), "F32"), start, stop, files, steps, resume_from
    )


def test_band_from_increment_dots_is_the_expanded_square():
    g = np.random.default_rng(3)
    x = g.normal(size=(12, 50))
    d = np.diff(x, axis=0)  # increments; checkpoint t = 11 has 11 increments behind it
    prev = np.array([np.sum((x[10] - x[10 - k]) ** 2) for k in range(1, 6)])
    dots = np.array([d[10] @ d[10 - j] for j in range(5)])
    want = [np.sum((x[11] - x[11 - k]) ** 2) for k in range(1, 6)]
    np.testing.assert_allclose(band_from_increment_dots(prev, dots), want, rtol=1e-12)
    # missing history propagates as NaN: t = 2 has lags 1, 2 only
    prev2 = np.array([np.sum((x[1] - x[0]) ** 2), np.nan, np.nan])
    dots2 = np.array([d[1] @ d[1], d[1] @ d[0], np.nan])
    got = band_from_increment_dots(prev2, dots2)
    np.testing.assert_allclose(
        got[:2], [np.sum((x[2] - x[1]) ** 2), np.sum((x[2] - x[0]) ** 2)], rtol=1e-12
    )
    assert np.isnan(got[2])


@pytest.mark.parametrize("slice_elems", [40, 200, 10**6])
def test_measure_block_matches_direct_definitions(tmp_path, slice_elems):
    """Band (rtol 1e-5: fp32 dot products of increments vs fp32 differences) and ensemble
    windows (1e-5 relative) equal the direct computations, for slices of one row, five rows
    and the whole block."""
    values, files, steps = _series(tmp_path)
    settings = MeasureSettings(
        max_lag=5, ensemble_window=6, entropy_sample=10**6, slice_elems=slice_elems
    )
    out = measure_block(_task(files, steps), settings)
    np.testing.assert_allclose(out["sq_distance"], _direct_band(values, 5), rtol=1e-5)
    want = [window_statistics(values[a : a + 6], steps[a : a + 6]) for a in range(0, N_CKPT - 5, 6)]
    np.testing.assert_allclose(out["ensemble_log_var"], [lv for lv, _ in want], rtol=1e-5)
    assert list(out["ensemble_frozen"]) == [n for _, n in want] == [0, 0, 0]
    stacked = torch.stack(values).reshape(N_CKPT, -1).double()
    np.testing.assert_allclose(
        out["sum"], stacked.sum(1).numpy(), atol=1e-6 * stacked.abs().sum(1).max().item()
    )
    np.testing.assert_allclose(
        out["sample"], stacked.float().numpy()
    )  # sample >= n: every coordinate


def test_entropy_sample_is_the_same_coordinates_whatever_the_slice_size(tmp_path):
    """500 of the block's 3,840 coordinates, drawn per block: slices of one row, five rows and
    the whole block (the GPU's) store the same values."""
    values, files, steps = _series(tmp_path)
    stacked = torch.stack(values).reshape(N_CKPT, -1)
    samples = [
        measure_block(_task(files, steps), MeasureSettings(entropy_sample=500, slice_elems=n))[
            "sample"
        ]
        for n in (40, 200, 10**6)
    ]
    assert samples[0].shape == (N_CKPT, 500)
    for other in samples[1:]:
        np.testing.assert_array_equal(other, samples[0])
    columns = [int(np.flatnonzero(stacked[0].numpy() == v)[0]) for v in samples[0][0]]
    assert columns == sorted(set(columns))  # distinct coordinates, in block order
    np.testing.assert_array_equal(
        samples[0], stacked[:, columns].numpy()
    )  # the same ones at every step


def test_nonfinite_checkpoint_falls_back_to_direct_sums(tmp_path):
    """A NaN and an Inf at checkpoint 7: lags reaching it skip those elements (direct masked
    sums), later checkpoints return to the increment ring, windows holding it use the values."""
    values, files, steps = _series(tmp_path, nan_at=(7, 10, 3))
    settings = MeasureSettings(max_lag=5, ensemble_window=6, entropy_sample=10**6, slice_elems=400)
    out = measure_block(_task(files, steps), settings)
    np.testing.assert_allclose(out["sq_distance"], _direct_band(values, 5), rtol=1e-5)
    assert np.isfinite(out["sq_distance"][5:]).all()  # full history from checkpoint max_lag on
    assert list(out["nonfinite"]) == [2 if i == 7 else 0 for i in range(N_CKPT)]
    clean = [torch.nan_to_num(v, nan=0.0, posinf=0.0) for v in values]
    want = [
        window_statistics(clean[a : a + 6], steps[a : a + 6])[0] for a in range(0, N_CKPT - 5, 6)
    ]
    np.testing.assert_allclose(out["ensemble_log_var"], want, rtol=1e-5)


@pytest.mark.parametrize("nan_at", [None, (10, 10, 3)])
def test_resumed_block_equals_the_tail_of_a_full_one(tmp_path, nan_at):
    """resume_from = 13: checkpoints 8..12 only prime the ring (13 - max_lag) and the open
    window (starts at 12); the stored rows equal the full run's rows 13.. (also with a NaN and
    an Inf in priming checkpoint 10: its finite flag comes from the sum, not the moments)."""
    values, files, steps = _series(tmp_path, nan_at=nan_at)
    settings = MeasureSettings(max_lag=5, ensemble_window=6, entropy_sample=10**6, slice_elems=200)
    full = measure_block(_task(files, steps), settings)
    tail = measure_block(_task(files, steps, resume_from=13), settings)
    np.testing.assert_allclose(tail["sq_distance"], full["sq_distance"][13:], rtol=1e-6)
    np.testing.assert_allclose(tail["sumsq"], full["sumsq"][13:], rtol=1e-12)
    np.testing.assert_allclose(tail["ensemble_log_var"], full["ensemble_log_var"][2:], rtol=1e-6)


def test_increment_statistics_read_a_permuted_ring():
    """The ring stores increment j in an arbitrary row; rows outside the window are ignored."""
    g = torch.Generator().manual_seed(5)
    values = [torch.randn(300, generator=g) * 1e-2 + 1.0 for _ in range(5)]
    values[2][:7] = values[1][:7]  # some coordinates constant over part of the window
    steps = [0, 10, 20, 35, 50]
    ring = torch.randn(6, 300, generator=g)
    rows = [4, 0, 5, 2]
    for j, r in enumerate(rows, start=1):
        ring[r] = values[j] - values[j - 1]
    got = increment_window_statistics(ring, rows, steps, values[0])
    want = window_statistics(values, steps)
    assert got[1] == want[1]
    assert got[0] == pytest.approx(want[0], rel=1e-6)


def test_spectral_metrics_per_checkpoint_with_sliced_statistics(tmp_path):
    """--spectral: the block statistics still come from cache slices (here 5 rows), the SVD
    metrics from the whole matrix read once more per checkpoint; NaN where it has NaN/Inf."""
    from pipeline.estimators.spectral import singular_values, spectral_metrics

    values, files, steps = _series(tmp_path, nan_at=(4, 10, 3))
    settings = MeasureSettings(
        max_lag=5, ensemble_window=6, entropy_sample=10**6, slice_elems=200, spectral=True
    )
    out = measure_block(_task(files, steps), settings)
    for i, v in enumerate(values):
        if i == 4:
            assert np.isnan(out["spectral"][i]).all()
        else:
            np.testing.assert_allclose(
                out["spectral"][i], spectral_metrics(singular_values(v), ROWS, COLS), rtol=1e-10
            )
    np.testing.assert_allclose(out["sq_distance"], _direct_band(values, 5), rtol=1e-5)


def test_spectral_every_k_th_checkpoint_and_nan_elsewhere(tmp_path):
    """measure.spectral_every = 3: spectra at checkpoints 0, 3, 6, ... of the run, equal to the
    every-checkpoint ones there, NaN elsewhere; a resumed task keeps the run's indices; the
    other statistics do not change; 0 is refused in one line."""
    from pipeline.core.errors import InputError

    _, files, steps = _series(tmp_path)
    every = MeasureSettings(spectral=True, slice_elems=200)
    third = MeasureSettings(spectral=True, slice_elems=200, spectral_every=3)
    full, sparse = (
        measure_block(_task(files, steps), every),
        measure_block(_task(files, steps), third),
    )
    for i in range(N_CKPT):
        if i % 3 == 0:
            np.testing.assert_array_equal(sparse["spectral"][i], full["spectral"][i])
        else:
            assert np.isnan(sparse["spectral"][i]).all()
    np.testing.assert_array_equal(sparse["sq_distance"], full["sq_distance"])
    resumed = measure_block(_task(files, steps, resume_from=10), third)
    assert np.isnan(resumed["spectral"][0]).all()  # checkpoint 10
    np.testing.assert_array_equal(resumed["spectral"][2], full["spectral"][12])
    with pytest.raises(InputError, match="spectral_every"):
        MeasureSettings(spectral_every=0)
