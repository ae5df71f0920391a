"""Checkpoint series with a known temperature, written as real safetensors files.

``simulate_quadratic_series``: SGD/Langevin ``theta -= lr * (grad L + sigma_l * xi)`` on a
quadratic loss per layer, ``L_l = 1/2 y^T diag(h) y + g * y_0`` in the eigenbasis y = Q^T
(theta - theta*), Q a random orthogonal matrix (so the curvature H = Q diag(h) Q^T is not
diagonal in the saved coordinates), h log-spaced over ``curvature_decades`` decades, and one
flat direction (h = 0) with constant gradient g (the drifting river direction). True
temperature T_l = lr * sigma_l^2 / 2, diffusivity D_l = lr^2 sigma_l^2 (METHODS.md,
Conventions). The chain is advanced exactly in distribution between checkpoints (AR(1) per
eigen-direction per constant-LR segment), so thousands of steps cost a few array operations.

``simulate_linear_regression_sgd``: minibatch SGD on least squares, over- or
under-parameterized (free-energy / T -> 0 toy of Sadrtdinov et al. 2025).

``reference_band``: reads a written series with ``safetensors.torch.load_file`` and builds the
squared-distance band with ``sq_distance_band`` (a reference for tests, not the pipeline's
streaming reader).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from threadpoolctl import threadpool_limits

from pipeline.estimators.displacement import sq_distance_band
from pipeline.ingest.safetensors_io import torch_dtype

#: dtype codes the simulators write
SAVE_DTYPES = ("F32", "BF16")


@dataclass(frozen=True)
class LayerSpec:
    """One simulated layer: noise std sigma (per coordinate, gradient units), curvature range
    [curvature_min, curvature_min * 10**curvature_decades] (loss / weight^2), constant gradient
    ``drift_gradient`` along the flat direction (loss / weight), rms ``weight_scale`` of the
    minimum's location theta* (weight)."""

    noise_std: float
    shape: tuple = (16, 32)
    curvature_min: float = 1e-3
    curvature_decades: float = 2.0
    drift_gradient: float = 0.0
    weight_scale: float = 0.05
    # "isotropic": noise std noise_std in every direction (the estimator's own assumption);
    # "hessian": variance noise_std^2 h_i / mean(h) along curvature h_i (SGD's noise covariance
    # is ~ proportional to the Hessian near a minimum), same mean variance, none on the flat one
    noise: str = "isotropic"


@dataclass
class SimulationTruth:
    """What was written and the true answer. ``temperature[l, p]`` (loss units: lr sigma^2 / 2
    for isotropic noise, the exact stationary 2 <L - L*> / n for Hessian-shaped noise) and
    ``diffusivity[l, p]`` (weight^2/param/step) per layer and LR plateau (NaN when unknown);
    ``plateaus[p] = (first_step, last_step, lr)`` over the updates (first_step-1 -> first_step
    is the first update at that LR)."""

    out_dir: Path
    files: list
    steps: np.ndarray
    layer_names: list
    learning_rate: np.ndarray  # lr of the update that produced each checkpoint (NaN at step 0)
    loss: np.ndarray
    plateaus: list
    temperature: np.ndarray
    diffusivity: np.ndarray
    curvatures: list = field(default_factory=list)
    log_path: Path | None = None


def _lr_per_step(lr_schedule, total_steps: int) -> np.ndarray:
    """lr[u] for update u = 1..total_steps (index 0 unused) from plateaus or a callable."""
    if callable(lr_schedule):
        lrs = [float(lr_schedule(u)) for u in range(1, total_steps + 1)]
    else:
        lrs = [float(lr) for n, lr in lr_schedule for _ in range(int(n))]
        lrs = (lrs + [lrs[-1]] * total_steps)[:total_steps]
    return np.asarray([np.nan] + lrs)


def _plateaus(lr: np.ndarray) -> list:
    out, start = [], 1
    for u in range(2, lr.size + 1):
        if u == lr.size or lr[u] != lr[start]:
            out.append((start, u - 1, float(lr[start])))
            start = u
    return out


def _advance(y, h, grad, sigma, lr, k, rng):
    """Exact k updates y <- y - lr (h y + grad + sigma xi) at constant lr (in distribution)."""
    if np.any(lr * h >= 2.0):
        raise ValueError(f"unstable: lr * h_max = {lr * h.max():.3g} >= 2")
    a = 1.0 - lr * h
    ak = a**k
    flat = h == 0
    geo = np.where(flat, k, (1.0 - ak) / np.where(flat, 1.0, 1.0 - a))  # sum_{j<k} a^j
    geo2 = np.where(flat, k, (1.0 - ak * ak) / np.where(flat, 1.0, 1.0 - a * a))
    noise = lr * sigma * np.sqrt(geo2) * rng.standard_normal(y.shape)
    return ak * y - lr * grad * geo + noise


def _noise_std(spec: LayerSpec, h: np.ndarray) -> np.ndarray:
    """Per-direction gradient-noise std (gradient units) of a layer (``LayerSpec.noise``)."""
    if spec.noise == "isotropic":
        return np.full(h.shape, spec.noise_std)
    if spec.noise == "hessian":
        return spec.noise_std * np.sqrt(h / h.mean())
    raise ValueError(f"noise must be 'isotropic' or 'hessian', not {spec.noise!r}")


def _equipartition_temperature(h: np.ndarray, sigma: np.ndarray, lr: float) -> float:
    """2 <L - L*> / n at stationarity (loss units): the exact discrete-time SGD variance
    lr sigma_i^2 / (h_i (2 - lr h_i)) of each valley direction carries h_i var_i / 2 of loss,
    so 2 <L - L*> / n = mean_i lr sigma_i^2 / (2 - lr h_i) over the n directions (the flat,
    noiseless one contributes 0)."""
    return float(np.mean(np.where(h > 0, lr * sigma**2 / (2 - lr * h), 0.0)))


def _write_checkpoint(path, tensors: dict, dtype: str) -> None:
    save_file({k: v.to(torch_dtype(dtype)).contiguous() for k, v in tensors.items()}, str(path))


def _write_log(path, steps, loss, lr) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr"])
        for s, l, r in zip(steps, loss, lr):
            w.writerow([int(s), repr(float(l)), "" if not np.isfinite(r) else repr(float(r))])


def _checkpoint_steps(total_steps, checkpoint_every, n_checkpoints, checkpoint_steps):
    if checkpoint_steps is not None:
        steps = np.asarray(sorted(set(int(s) for s in checkpoint_steps)), dtype=np.int64)
    else:
        n = n_checkpoints if n_checkpoints is not None else total_steps // checkpoint_every + 1
        steps = np.arange(n, dtype=np.int64) * checkpoint_every
    if steps[0] < 0 or steps[-1] > total_steps:
        raise ValueError(f"checkpoint steps must lie in 0..{total_steps}")
    return steps


def simulate_quadratic_series(
    out_dir,
    layers: Sequence[LayerSpec],
    lr_schedule: Callable[[int], float] | Sequence[tuple[int, float]],
    checkpoint_every: int = 1,
    n_checkpoints: int | None = None,
    dtype: str = "F32",
    seed: int = 0,
    checkpoint_steps: Sequence[int] | None = None,
    total_steps: int | None = None,
) -> SimulationTruth:
    """Run SGD with Gaussian gradient noise on per-layer quadratics; write the series.

    Writes ``step_%06d.safetensors`` (tensors ``layers.<i>.weight`` of each spec's shape, in
    ``dtype`` F32 or BF16) at the checkpoint steps (every ``checkpoint_every`` updates from 0, or
    ``checkpoint_steps``) and ``log.csv`` (step, true loss, lr of the update ending at that
    step). Valley directions start from the stationary distribution at the first LR (exact
    discrete-time variance lr sigma^2 / (h (2 - lr h))). ``lr_schedule``: list of
    (n_steps, lr) plateaus or a callable step -> lr (then give ``total_steps`` or
    ``n_checkpoints``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(SAVE_DTYPES)}")
    if total_steps is None:
        if callable(lr_schedule):
            total_steps = (n_checkpoints - 1) * checkpoint_every
        else:
            total_steps = int(sum(n for n, _ in lr_schedule))
    lr = _lr_per_step(lr_schedule, total_steps)
    steps = _checkpoint_steps(total_steps, checkpoint_every, n_checkpoints, checkpoint_steps)
    rng = np.random.default_rng(seed)
    state = []
    for spec in layers:
        n = int(np.prod(spec.shape))
        h = np.concatenate(
            [[0.0], spec.curvature_min * np.logspace(0, spec.curvature_decades, n - 1)]
        )
        with threadpool_limits(1):  # small QR: BLAS threads only add contention
            q, r = np.linalg.qr(rng.standard_normal((n, n)))
        q = q * np.sign(np.diag(r))
        sigma = _noise_std(spec, h)
        grad = np.zeros(n)
        grad[0] = spec.drift_gradient
        lr0 = lr[1]
        var0 = np.where(h > 0, lr0 * sigma**2 / np.where(h > 0, h * (2 - lr0 * h), 1), 0)
        y = np.sqrt(var0) * rng.standard_normal(n)
        centre = spec.weight_scale * rng.standard_normal(n)
        state.append(dict(spec=spec, h=h, q=q, grad=grad, y=y, centre=centre, sigma=sigma))
    names = [f"layers.{i}.weight" for i in range(len(layers))]

    def checkpoints():
        current = 0
        for step in steps:
            current = _run_segments(state, lr, current, int(step), rng)
            tensors, loss = {}, 0.0
            for name, st in zip(names, state):
                theta = st["centre"] + st["q"] @ st["y"]
                tensors[name] = torch.from_numpy(theta.reshape(st["spec"].shape).astype(np.float32))
                loss += 0.5 * float(np.sum(st["h"] * st["y"] ** 2)) + float(st["grad"] @ st["y"])
            yield tensors, loss

    ckpt_lr = lr[steps]
    files, losses, log_path = _write_series(out_dir, steps, checkpoints(), dtype, ckpt_lr)
    plateaus = _plateaus(lr)
    sig2 = np.array([s.noise_std**2 for s in layers])[:, None]
    equip = np.array(
        [[_equipartition_temperature(st["h"], st["sigma"], p[2]) for p in plateaus] for st in state]
    )
    plr = np.array([p[2] for p in plateaus])[None, :]
    return SimulationTruth(
        out_dir=out_dir,
        files=files,
        steps=steps,
        layer_names=names,
        learning_rate=ckpt_lr,
        loss=losses,
        plateaus=plateaus,
        temperature=np.where(
            np.array([s.noise == "hessian" for s in layers])[:, None], equip, plr * sig2 / 2.0
        ),
        diffusivity=plr**2 * sig2,
        curvatures=[st["h"] for st in state],
        log_path=log_path,
    )


def _write_series(out_dir: Path, steps, checkpoints, dtype: str, ckpt_lr):
    """Save each (tensors, loss) of ``checkpoints`` (one per step) as ``step_%06d.safetensors``
    and the log ``log.csv``; returns (files, losses, log path)."""
    files, losses = [], []
    for step, (tensors, loss) in zip(steps, checkpoints):
        path = out_dir / f"step_{int(step):06d}.safetensors"
        _write_checkpoint(path, tensors, dtype)
        files.append(path)
        losses.append(loss)
    log_path = out_dir / "log.csv"
    _write_log(log_path, steps, losses, ckpt_lr)
    return files, np.asarray(losses), log_path


def _run_segments(state, lr, current: int, target: int, rng) -> int:
    """Advance every layer from update count ``current`` to ``target`` by constant-LR segments."""
    while current < target:
        seg_lr = lr[current + 1]
        end = current + 1
        while end < target and lr[end + 1] == seg_lr:
            end += 1
        for st in state:
            st["y"] = _advance(
                st["y"], st["h"], st["grad"], st["sigma"], seg_lr, end - current, rng
            )
        current = end
    return current


def simulate_linear_regression_sgd(
    out_dir,
    n_samples: int,
    n_features: int,
    learning_rate: float,
    n_steps: int,
    checkpoint_every: int,
    batch_size: int = 1,
    burn_in: int = 0,
    label_noise: float = 0.5,
    dtype: str = "F32",
    seed: int = 0,
    shape: tuple | None = None,
) -> SimulationTruth:
    """Minibatch SGD on L(w) = 1/(2N) sum_i (x_i . w - y_i)^2; writes the series like above.

    Data: x_i ~ N(0, I / n_features), y_i = x_i . w_true + label_noise * eps_i. With
    n_features > n_samples the model interpolates (every sample's gradient vanishes at the
    optimum, so gradient noise -> 0 and T -> 0); with n_features < n_samples the residuals
    stay finite and SGD noise keeps T > 0 (Sadrtdinov et al. 2025). ``burn_in`` updates run
    before step 0's checkpoint; the weight is saved as ``layers.0.weight`` of ``shape``
    (default (n_features//32, 32) when divisible, else (1, n_features)). ``temperature`` is
    unknown (NaN) by design.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_samples, n_features)) / np.sqrt(n_features)
    w_true = rng.standard_normal(n_features)
    y = x @ w_true + label_noise * rng.standard_normal(n_samples)
    if shape is None:
        shape = (n_features // 32, 32) if n_features % 32 == 0 else (1, n_features)
    w = np.zeros(n_features)

    def sgd(w, k):
        for idx in rng.integers(0, n_samples, (k, batch_size)):
            xb = x[idx]
            w = w - (learning_rate / batch_size) * ((xb @ w - y[idx]) @ xb)
        return w

    w = sgd(w, burn_in)
    steps = np.arange(0, n_steps + 1, checkpoint_every, dtype=np.int64)

    def checkpoints():
        nonlocal w
        for i in range(len(steps)):
            if i:
                w = sgd(w, checkpoint_every)
            weight = torch.from_numpy(w.reshape(shape).astype(np.float32))
            yield {"layers.0.weight": weight}, 0.5 * float(np.mean((x @ w - y) ** 2))

    ckpt_lr = np.where(steps > 0, learning_rate, np.nan)
    files, losses, log_path = _write_series(out_dir, steps, checkpoints(), dtype, ckpt_lr)
    return SimulationTruth(
        out_dir=out_dir,
        files=files,
        steps=steps,
        layer_names=["layers.0.weight"],
        learning_rate=ckpt_lr,
        loss=losses,
        plateaus=[(1, int(steps[-1]), float(learning_rate))],
        temperature=np.full((1, 1), np.nan),
        diffusivity=np.full((1, 1), np.nan),
        log_path=log_path,
    )


def reference_band(files: Sequence, tensor_name: str, max_lag: int) -> tuple[np.ndarray, int]:
    """Band d2[t, k-1] of one tensor over a series, reading each file once in order with
    ``load_file`` and keeping the last ``max_lag`` tensors; also the tensor's element count."""
    d2 = np.full((len(files), max_lag), np.nan)
    previous: list[torch.Tensor] = []
    numel = 0
    for t, path in enumerate(files):
        current = load_file(str(path))[tensor_name]
        numel = current.numel()
        if previous:
            d2[t, : len(previous)] = sq_distance_band(current, previous)
        previous = ([current] + previous)[:max_lag]
    return d2, numel
