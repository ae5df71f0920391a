"""Known answer with realistic gradient noise: covariance proportional to the Hessian.

The other simulators use isotropic noise, which is the estimator's own assumption. Here the
noise variance along each curvature direction is proportional to its curvature (SGD near a
minimum), so the noise sits in the stiff directions that relax fastest. The truth is the
equipartition temperature 2 <L - L*> / n (exact stationary discrete-time value, and checked
against the simulated loss itself). Real safetensors files; the estimator on the reference band.
"""

import numpy as np

from pipeline.estimators.displacement import diffusivity_from_band, window_learning_rate
from pipeline.testing.simulate import LayerSpec, reference_band, simulate_quadratic_series

LRS = (0.01, 0.03)
SPACING, PER_PLATEAU, WINDOW = 10, 40, 8
SIGMAS = (0.01, 0.02, 0.03)


def test_hessian_noise_temperature_is_twice_excess_loss_per_parameter(tmp_path):
    h_max = 0.3 / (LRS[1] * SPACING)  # stiffest direction: 0.3 relaxation per interval
    specs = [
        LayerSpec(noise_std=s, curvature_min=h_max / 100, noise="hessian", weight_scale=0.1)
        for s in SIGMAS
    ]
    truth = simulate_quadratic_series(
        tmp_path,
        specs,
        [(PER_PLATEAU * SPACING, LRS[0]), (PER_PLATEAU * SPACING, LRS[1])],
        checkpoint_every=SPACING,
        seed=4,
    )
    steps, lr = truth.steps, truth.learning_rate
    window_lr = window_learning_rate(steps, steps, lr, WINDOW, 4)
    table = np.full(truth.temperature.shape, np.nan)
    for j, name in enumerate(truth.layer_names):
        d2, n = reference_band(truth.files, name, WINDOW)
        res = diffusivity_from_band(steps, d2, n, WINDOW, min_window=4)
        temp = np.where(res["identifiable"], res["diffusivity"] / (2 * window_lr), np.nan)
        for p, (first, last, _) in enumerate(truth.plateaus):
            inside = (steps[res["window_start"]] >= first - 1) & (steps[res["window_end"]] <= last)
            table[j, p] = np.nanmean(temp[inside & (res["window_start"] >= 0)])
    rel = table / truth.temperature - 1
    # the simulated loss itself: 2 <L - L*> / N over each plateau's second half (L* = 0)
    n_total = sum(int(np.prod(s.shape)) for s in specs)
    measured_2l = []
    for first, last, _ in truth.plateaus:
        half = (steps >= (first + last) / 2) & (steps <= last)
        measured_2l.append(2 * np.mean(np.asarray(truth.loss)[half]) / n_total)
    exact_2l = truth.temperature.mean(axis=0)  # equal layer sizes: plain mean
    print(
        f"\n[hessian noise] T rel. error (layer x plateau):\n{np.round(rel, 4)}\n"
        f"2<L-L*>/n exact {exact_2l}, from the simulated loss {np.round(measured_2l, 8)}"
    )
    np.testing.assert_allclose(measured_2l, exact_2l, rtol=0.1)  # the truth is the loss's
    assert np.all(np.abs(rel) < 0.1), rel
    ratio = table[:, 1] / table[:, 0]
    exact_ratio = truth.temperature[:, 1] / truth.temperature[:, 0]
    assert np.all(np.abs(ratio / exact_ratio - 1) < 0.1)
