"""Demo checkpoint series: a small MLP trained with plain SGD (and one AdamW run) on
scikit-learn's digits.

Real training on real data, saved in the Hugging Face Trainer layout so that the whole
pipeline (discovery, logs, activations, measurement, temperatures) runs on it unchanged:

    root/<run>/config.json                         activation after each layer
    root/<run>/checkpoint-<step>/model.safetensors  parameters at <step> (step 0 = init)
    root/<run>/checkpoint-<step>/optimizer.pt       torch.optim state_dict (SGD or AdamW)
    root/<run>/checkpoint-<step>/trainer_state.json log_history up to <step>
    root/demo.json                                  settings marker, written last

``make_demo`` writes one run with a warmup -> constant -> decay schedule, a sweep of
constant-LR SGD runs and one constant-LR AdamW run; see METHODS.md for what each is for.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pipeline.core.atomic import replace_dir, write_text
from pipeline.core.errors import InputError
from pipeline.ingest.safetensors_io import DTYPES, torch_dtype

DEMO_FORMAT = 2  # bump when the files written change, so old demos are regenerated
MARKER = "demo.json"

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "silu": F.silu,
}
#: dtype codes the demo can save its checkpoints in
SAVE_DTYPES = ("F32", "F64", "F16", "BF16")


# ----------------------------------------------------------------------------- data
class DigitsData(NamedTuple):
    """Standardized digits split: x as float32 (n, 64), y as int64 class labels 0..9."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@lru_cache(maxsize=1)
def _digits_arrays(test_fraction: float = 0.25, split_seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0  # pixels that are always 0 in the training set stay 0
    arrays = [(x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te]
    for a in arrays:
        a.setflags(write=False)
    return arrays


def digits_dataset(label_noise: float = 0.0) -> DigitsData:
    """scikit-learn's 8x8 digits (1797 samples, 10 classes), stratified 75/25 split (fixed
    seed 0), each pixel standardized with the training mean and std (constant pixels: std 1).

    ``label_noise`` > 0 replaces round(label_noise * n_train) training labels, chosen with a
    fixed seed (the same for every run), by a different class drawn uniformly; the test
    labels stay clean. Returns fresh tensors each call (the caller may modify them)."""
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    x_tr, y_tr, x_te, y_te = _digits_arrays()
    y_train = torch.tensor(y_tr, dtype=torch.int64)
    if label_noise > 0:
        gen = torch.Generator().manual_seed(12345)
        flip = torch.randperm(len(y_train), generator=gen)[: round(label_noise * len(y_train))]
        y_train[flip] = (y_train[flip] + torch.randint(1, 10, (len(flip),), generator=gen)) % 10
    return DigitsData(
        torch.tensor(x_tr, dtype=torch.float32),
        y_train,
        torch.tensor(x_te, dtype=torch.float32),
        torch.tensor(y_te, dtype=torch.int64),
    )


# ----------------------------------------------------------------------------- model
class DigitsMLP(nn.Module):
    """MLP 64 -> hidden... -> 10. ``layers.i`` is the i-th nn.Linear (the last is the
    classifier); activation ``activations[i]`` follows hidden layer i, identity follows the
    classifier (softmax lives in the cross-entropy loss)."""

    def __init__(
        self,
        hidden: Sequence[int] = (64, 32),
        activations: Sequence[str] = ("tanh", "relu"),
        n_in: int = 64,
        n_out: int = 10,
    ):
        super().__init__()
        if len(hidden) != len(activations):
            raise ValueError(f"{len(hidden)} hidden layers but {len(activations)} activations")
        unknown = [a for a in activations if a not in _ACTIVATIONS]
        if unknown:
            raise ValueError(f"unknown activation(s) {unknown}; known: {sorted(_ACTIVATIONS)}")
        sizes = [n_in, *hidden, n_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation_names = [*activations, "identity"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, name in zip(self.layers, self.activation_names):
            x = _ACTIVATIONS[name](layer(x))
        return x


def activation_map(activations: Sequence[str]) -> dict[str, str]:
    """Module prefix -> activation that follows it, e.g. {"layers.0": "tanh", ...,
    "layers.<last>": "identity"}."""
    names = [*activations, "identity"]
    return {f"layers.{i}": a for i, a in enumerate(names)}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Full-batch mean cross-entropy (nats/sample) and accuracy (fraction) of ``model``."""
    logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(dim=1) == y).double().mean().item()
    return loss, acc


# ----------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class ConstantLR:
    """lr(step) = lr for every step."""

    lr: float

    def __call__(self, step: int) -> float:
        return float(self.lr)


@dataclass(frozen=True)
class WarmupConstantDecay:
    """Linear warmup to ``peak`` over the first ``warmup_fraction`` of ``n_steps``
    (lr(s) = peak*(s+1)/W, so the first update already moves), constant ``peak``, then cosine
    decay from ``peak`` to ``final_fraction*peak`` over the last ``decay_fraction``
    (reaching the final value at s = n_steps)."""

    peak: float
    n_steps: int
    warmup_fraction: float = 0.1
    decay_fraction: float = 0.4
    final_fraction: float = 0.01

    def __call__(self, step: int) -> float:
        warmup = max(1, round(self.warmup_fraction * self.n_steps))
        decay_start = self.n_steps - round(self.decay_fraction * self.n_steps)
        if step < warmup:
            return self.peak * (step + 1) / warmup
        if step < decay_start:
            return float(self.peak)
        progress = min(1.0, (step - decay_start) / max(1, self.n_steps - decay_start))
        final = self.final_fraction * self.peak
        return final + (self.peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- training
@contextmanager
def _deterministic(seed: int):
    """Seed torch's global RNG and use one thread; restore both afterwards."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless minibatch indices: epochs of random permutations, the ragged tail dropped so
    every step sees exactly ``batch_size`` samples (constant gradient-noise scale)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def _write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def _save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    dtype: torch.dtype,
    history: list[dict],
    n_steps: int,
    every: int,
) -> None:
    ckpt = run_dir / f"checkpoint-{step}"
    ckpt.mkdir()
    tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}
    save_file(
        tensors, str(ckpt / "model.safetensors"), metadata={"step": str(step), "format": "pt"}
    )
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")  # as the HF Trainer does
    state = {
        "global_step": step,
        "max_steps": n_steps,
        "logging_steps": every,
        "save_steps": every,
        "epoch": history[-1]["epoch"],
        "log_history": list(history),
    }
    _write_json(ckpt / "trainer_state.json", state)


def _log_entry(model, data: DigitsData, step: int, lr: float, batch_size: int) -> dict:
    loss, _ = evaluate(model, data.x_train, data.y_train)
    eval_loss, eval_acc = evaluate(model, data.x_test, data.y_test)
    return {
        "step": step,
        "epoch": step * batch_size / len(data.y_train),
        "loss": loss,
        "learning_rate": lr,
        "eval_loss": eval_loss,
        "eval_accuracy": eval_acc,
    }


def _check_run_args(out_dir: Path, n_steps, checkpoint_every, batch_size, dtype, n_train):
    if dtype not in SAVE_DTYPES:
        raise InputError(out_dir, f"unsupported dtype {dtype!r}; use one of {sorted(SAVE_DTYPES)}")
    if n_steps < 1 or checkpoint_every < 1:
        raise InputError(
            out_dir, f"n_steps ({n_steps}) and checkpoint_every ({checkpoint_every}) must be >= 1"
        )
    if not 1 <= batch_size <= n_train:
        raise InputError(out_dir, f"batch_size {batch_size} must be in 1..{n_train}")
    if out_dir.exists() and any(out_dir.glob("checkpoint-*")):
        raise InputError(out_dir, "already holds checkpoint-* folders; refusing to mix runs")


def train_digits_run(
    out_dir,
    lr_schedule: Callable[[int], float],
    n_steps: int,
    checkpoint_every: int,
    batch_size: int = 32,
    seed: int = 0,
    hidden=(64, 32),
    activations=("tanh", "relu"),
    dtype: str = "F32",
    label_noise: float = 0.0,
    optimizer: str = "sgd",
    betas: tuple = (0.9, 0.999),
) -> Path:
    """Train ``DigitsMLP`` with plain minibatch SGD (no momentum, no weight decay; or with
    ``optimizer="adamw"``: ``torch.optim.AdamW`` with ``betas``, weight decay 0.01 on the
    matrices as the HF Trainer groups them) on the standardized digits training split and save a
    Trainer-layout series (``model.safetensors``, ``optimizer.pt``, ``trainer_state.json``) under
    ``out_dir``. The saved optimizer state holds the next update's learning rate, as after the
    Trainer's scheduler step.

    The update from step s to s+1 uses ``lr_schedule(s)``; the log entry at step t records
    ``learning_rate = lr_schedule(t)`` (the rate of the next update, as the HF Trainer logs
    it) and ``loss`` = full-batch training cross-entropy (nats/sample) of the weights saved at
    t (on the training labels SGD sees, noisy ones included when ``label_noise`` > 0, see
    ``digits_dataset``), plus ``eval_loss``/``eval_accuracy`` on the clean test split.
    Checkpoints at step 0, every ``checkpoint_every`` steps and at ``n_steps``. Training is
    fp32 on one thread; tensors are cast to ``dtype`` (safetensors code) when saved. Same
    arguments -> identical files.
    """
    out_dir = Path(out_dir)
    if not 0.0 <= label_noise < 1.0:
        raise InputError(out_dir, f"label_noise {label_noise} must be in [0, 1)")
    data = digits_dataset(label_noise)
    _check_run_args(out_dir, n_steps, checkpoint_every, batch_size, dtype, len(data.y_train))
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", _run_config(hidden, activations, dtype, label_noise))
    with _deterministic(seed):
        model = DigitsMLP(hidden, activations)
        batches = _batches(len(data.y_train), batch_size, torch.Generator().manual_seed(seed))
        opt = _optimizer(model, optimizer, _lr(lr_schedule, 0, out_dir), betas)
        history = [_log_entry(model, data, 0, _lr(lr_schedule, 0, out_dir), batch_size)]
        save = (torch_dtype(dtype), history, n_steps, checkpoint_every)
        _save_checkpoint(out_dir, model, opt, 0, *save)
        for step in range(n_steps):
            _train_step(model, opt, data, next(batches), _lr(lr_schedule, step, out_dir))
            done = step + 1
            if done % checkpoint_every == 0 or done == n_steps:
                lr_next = _lr(lr_schedule, done, out_dir)
                history.append(_log_entry(model, data, done, lr_next, batch_size))
                for group in opt.param_groups:  # the scheduler has stepped: next update's lr
                    group["lr"] = lr_next
                _save_checkpoint(out_dir, model, opt, done, *save)
    return out_dir


def _lr(schedule, step: int, where: Path) -> float:
    lr = float(schedule(step))
    if not math.isfinite(lr) or lr < 0:
        raise InputError(where, f"lr_schedule({step}) = {lr}; need a finite value >= 0")
    return lr


def _optimizer(model: nn.Module, kind: str, lr: float, betas=(0.9, 0.999)) -> torch.optim.Optimizer:
    """Plain SGD (``p -= lr * grad``), or AdamW with the Trainer's groups (decay: matrices)."""
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if kind != "adamw":
        raise ValueError(f"demo optimizer {kind!r}: use 'sgd' or 'adamw'")
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def _train_step(model, opt: torch.optim.Optimizer, data: DigitsData, idx, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
    loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _run_config(hidden, activations, dtype: str, label_noise: float) -> dict:
    uniform = len(set(activations)) == 1
    return {
        "model_type": "thermoscope-digits-mlp",
        "architectures": ["DigitsMLP"],
        "input_size": 64,
        "hidden_sizes": list(hidden),
        "num_labels": 10,
        "num_hidden_layers": len(hidden),
        # HF configs name one activation; ours may differ per layer, then it is the list.
        "hidden_act": activations[0] if uniform else list(activations),
        "thermoscope_activations": activation_map(activations),
        "torch_dtype": DTYPES[dtype].torch_name,
        "thermoscope_label_noise": label_noise,
    }


# ----------------------------------------------------------------------------- the demo
@dataclass(frozen=True)
class DemoSettings:
    """Everything that determines the demo's bytes; stored in ``demo.json``."""

    quick: bool
    n_steps: int
    checkpoint_every: int
    batch_size: int = 32
    seed: int = 0
    hidden: tuple = (64, 32)
    activations: tuple = ("tanh", "relu")
    dtype: str = "F32"
    schedule_peak: float = 0.1
    sweep_lrs: tuple = (0.01, 0.03, 0.1, 0.3)
    # one AdamW run beside the SGD ones: its temperature comes from the optimizer state.
    # beta1 0.5: Adam's momentum then shortens the displacement by 1.3 steps, which the 10-step
    # spacing resolves (beta1 0.9 shortens it by 9.5 steps and needs >= 38; METHODS.md 3b)
    adamw_lr: float = 0.001
    adamw_betas: tuple = (0.5, 0.999)
    # 20% wrong training labels keep the loss (and the gradient noise) away from zero, so
    # constant-LR runs stay at a temperature that grows with LR (see METHODS.md).
    label_noise: float = 0.2
    format: int = DEMO_FORMAT

    def runs(self) -> dict[str, Callable[[int], float]]:
        """Run name -> LR schedule."""
        runs = {"schedule": WarmupConstantDecay(self.schedule_peak, self.n_steps)}
        runs.update({f"lr_{lr:g}": ConstantLR(lr) for lr in self.sweep_lrs})
        runs[f"adamw_lr_{self.adamw_lr:g}"] = ConstantLR(self.adamw_lr)
        return runs

    @staticmethod
    def optimizer(run: str) -> str:
        """The optimizer of a demo run (by its name)."""
        return "adamw" if run.startswith("adamw") else "sgd"

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def demo_settings(quick: bool = False) -> DemoSettings:
    """The bundled demo: 500 steps, a checkpoint every 10 (51 per run); quick: 100 steps."""
    return DemoSettings(quick=quick, n_steps=100 if quick else 500, checkpoint_every=10)


def _is_complete(root: Path, settings: DemoSettings) -> bool:
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker != settings.to_json():
        return False
    return all(
        (root / run / f"checkpoint-{settings.n_steps}" / "trainer_state.json").is_file()
        for run in settings.runs()
    )


def make_demo(root, quick: bool = False) -> Path:
    """Write the demo sweep under ``root`` (run ``schedule``, constant-LR runs ``lr_*``, AdamW
    run ``adamw_lr_*``).

    Returns at once if ``root`` already holds a complete demo with the same settings. Builds
    in a hidden temp folder beside ``root`` and moves it into place, so an interrupted call
    leaves either the old content or the new demo. Refuses to replace a non-empty folder
    that is not a demo (no ``demo.json``).
    """
    root = Path(root).absolute()
    settings = demo_settings(quick)
    if _is_complete(root, settings):
        return root
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise InputError(root, f"exists, is not empty and has no {MARKER}; refusing to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for name, schedule in settings.runs().items():
            train_digits_run(
                tmp / name,
                schedule,
                settings.n_steps,
                settings.checkpoint_every,
                settings.batch_size,
                settings.seed,
                settings.hidden,
                settings.activations,
                settings.dtype,
                settings.label_noise,
                settings.optimizer(name),
                settings.adamw_betas,
            )
        _write_json(tmp / MARKER, settings.to_json())
        replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.demo ROOT [--quick]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo", description=make_demo.__doc__.splitlines()[0]
    )
    parser.add_argument("root", help="folder to write the demo sweep into")
    parser.add_argument("--quick", action="store_true", help="short runs (100 steps) for tests")
    args = parser.parse_args(argv)
    print(make_demo(args.root, quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
