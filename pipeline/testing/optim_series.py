"""Checkpoint series written by real ``torch.optim`` optimizers, in the Hugging Face layout.

``simulate_optimizer_series`` trains per-layer diagonal quadratics
``L_l = 1/2 sum_i h_i (theta_i - theta*_i)^2`` with anisotropic gradient noise whose variance
follows the curvature (``sigma_i^2 = c_l h_i / mean(h)``, as for a Fisher ~ Hessian), using
``torch.optim.AdamW`` / ``Adam`` / ``SGD`` (momentum, Nesterov) with the Trainer's two param
groups (decay: 2-D weights, no-decay: 1-D). Every ``save_every`` updates it writes
``checkpoint-<step>/model.safetensors`` (F32 or BF16), ``optimizer.pt`` (the real
``optimizer.state_dict()``) and ``trainer_state.json`` (loss and learning rate log).

The truth (METHODS.md 3b): the layer temperature ``T_l = eta * mean_i(sigma_i^2 / P_i) / 2``
with ``P = sqrt(v_hat) + eps`` (Adam) or 1 (SGD) and ``eta = lr`` (Adam) or ``lr / (1 - mu)``
(heavy ball, Nesterov), averaged over each plateau's checkpoints; ``lyapunov`` holds
``2 <L_A - L_A*> / n_l`` over the checkpoints of the first plateau (``L_A`` includes decoupled
weight decay's ``lambda/2 sum P_i theta_i^2``), which the stationary Lyapunov equation makes
equal to the temperature. The parameters start in the stationary distribution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.ingest.safetensors_io import torch_dtype


@dataclass(frozen=True)
class QuadraticLayer:
    """One layer: ``shape``, noise scale ``noise`` (c_l: mean sigma_i^2 in gradient^2), and the
    relaxation times range (steps) of its directions, which sets the curvatures."""

    name: str
    shape: tuple
    noise: float
    relax_steps: tuple = (2000.0, 10000.0)


@dataclass
class OptimizerTruth:
    out_dir: Path
    steps: np.ndarray  # checkpoint steps
    layer_names: list
    plateaus: list  # (first_step, last_step, lr)
    temperature: np.ndarray  # (layer, plateau), loss units
    lyapunov: np.ndarray  # (layer,) 2 <L_A - L_A*> / n over the first plateau
    eta: list  # effective step size per plateau


def _make_optimizer(kind: str, groups, lr, momentum, weight_decay):
    if kind in ("adamw", "adam"):
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        for g in groups:
            g["weight_decay"] = g["weight_decay"] * weight_decay
        return cls(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    for g in groups:
        g["weight_decay"] = 0.0
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=kind == "nesterov")


def _eta(kind: str, lr: float, momentum: float) -> float:
    return lr if kind in ("adamw", "adam") else lr / (1.0 - momentum)


def _precond(opt, p, kind) -> torch.Tensor:
    if kind not in ("adamw", "adam") or p not in opt.state:
        return torch.ones_like(p)
    st, g = opt.state[p], opt.param_groups[0]
    bc = 1.0 - g["betas"][1] ** float(st["step"])
    return (st["exp_avg_sq"] / bc).sqrt() + g["eps"]


def simulate_optimizer_series(
    out_dir,
    layers: list[QuadraticLayer],
    kind: str = "adamw",
    plateaus: tuple = ((1600, 1e-3), (1600, 3e-4)),
    save_every: int = 40,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dtype: str = "F32",
    seed: int = 0,
    landscape_lr: float | None = None,
) -> OptimizerTruth:
    """Train, write the series, return the truth (see the module docstring). The curvatures
    put the relaxation times ``relax_steps`` at ``landscape_lr`` (default: the first plateau's
    lr; give the same value to every run of a sweep so they share one landscape). Single-threaded
    torch for the small tensors (thread wake-ups would cost more than the arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _simulate(
            Path(out_dir),
            layers,
            kind,
            plateaus,
            save_every,
            momentum,
            weight_decay,
            dtype,
            seed,
            landscape_lr,
        )
    finally:
        torch.set_num_threads(threads)


def _simulate(
    out, layers, kind, plateaus, save_every, momentum, weight_decay, dtype, seed, landscape_lr
):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    params, curv, sigma, centre = [], [], [], []
    lr0 = plateaus[0][1]
    eta0 = _eta(kind, lr0, momentum)
    eta_land = _eta(kind, landscape_lr or lr0, momentum)  # sets the curvatures
    for spec in layers:
        n = int(np.prod(spec.shape))
        tau = torch.logspace(*np.log10(spec.relax_steps), n, dtype=torch.float64)
        tau = tau[torch.randperm(n, generator=gen)].reshape(spec.shape)
        # relaxation time tau = P / (eta h); Adam: P ~ sigma = sqrt(c h), so h = c / (eta tau)^2
        adam = kind in ("adamw", "adam")
        h = spec.noise / (eta_land * tau) ** 2 if adam else 1.0 / (eta_land * tau)
        s = torch.sqrt(spec.noise * h)
        p_scale = s if adam else torch.ones_like(s)
        star = 0.05 * torch.randn(spec.shape, generator=gen, dtype=torch.float64)
        lam = weight_decay if kind == "adamw" and len(spec.shape) >= 2 else 0.0
        a = h + lam * p_scale  # decoupled decay: effective curvature h + lambda P
        std = torch.sqrt(eta0 * s**2 / (2 * a * p_scale))
        theta = h * star / a + std * torch.randn(spec.shape, generator=gen, dtype=torch.float64)
        params.append(torch.nn.Parameter(theta.float()))
        curv.append(h.float())
        sigma.append(s.float())
        centre.append(star.float())
    decay = [p for p, spec in zip(params, layers) if len(spec.shape) >= 2]
    nodecay = [p for p, spec in zip(params, layers) if len(spec.shape) < 2]
    groups = [{"params": decay, "weight_decay": 1.0}, {"params": nodecay, "weight_decay": 0.0}]
    opt = _make_optimizer(kind, groups, lr0, momentum, weight_decay)
    step, log, temps, lyap, etas, plateau_rows = 0, [], [], [], [], []
    ckpt_steps = []
    for n_steps, lr in plateaus:
        for g in opt.param_groups:
            g["lr"] = lr
        eta = _eta(kind, lr, momentum)
        etas.append(eta)
        acc_t, acc_l, count = np.zeros(len(layers)), np.zeros(len(layers)), 0
        first = step + 1
        for _ in range(n_steps):
            for p, h, s, c in zip(params, curv, sigma, centre):
                p.grad = torch.addcmul(h * (p.detach() - c), s, torch.randn(p.shape, generator=gen))
            opt.step()
            step += 1
            if step % save_every == 0:
                loss = sum(
                    float(0.5 * (h * (p.detach() - c) ** 2).sum())
                    for p, h, c in zip(params, curv, centre)
                )
                log.append({"step": step, "loss": loss, "learning_rate": lr})
                _save(out / f"checkpoint-{step}", layers, params, opt, dtype, log, step)
                ckpt_steps.append(step)
                for j, (p, h, s, c) in enumerate(zip(params, curv, sigma, centre)):
                    pre = _precond(opt, p, kind).detach()
                    acc_t[j] += eta * float((s * s / pre).mean()) / 2
                    lam = weight_decay if (kind == "adamw" and p.dim() >= 2) else 0.0
                    a = h + lam * pre
                    shifted = h * c / a  # minimum of L + lam/2 sum P theta^2
                    dev = p.detach() - shifted
                    acc_l[j] += float((a * dev * dev).sum()) / p.numel()  # 2 (L_A - L_A*) / n
                count += 1
        temps.append(acc_t / count)
        lyap.append(acc_l / count)
        plateau_rows.append((first, step, lr))
    return OptimizerTruth(
        out_dir=out,
        steps=np.asarray(ckpt_steps),
        layer_names=[spec.name for spec in layers],
        plateaus=plateau_rows,
        temperature=np.stack(temps, axis=1),
        lyapunov=lyap[0],
        eta=etas,
    )


def _save(folder: Path, layers, params, opt, dtype, log, step) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        spec.name: p.detach().to(torch_dtype(dtype)).contiguous() for spec, p in zip(layers, params)
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    state = {"global_step": step, "log_history": list(log)}
    (folder / "trainer_state.json").write_text(json.dumps(state))
