"""A real PEFT LoRA fine-tune of a tiny MLP on scikit-learn's digits, saved the way PEFT saves
it: ``checkpoint-<step>/adapter_model.safetensors`` + ``adapter_config.json`` every few steps
(``save_pretrained``), and the base model's weights as ``base/model.safetensors``.

``kind="conv1d"`` builds the MLP from transformers' ``Conv1D`` (GPT-2's layer, weight stored
(in, out)), which PEFT adapts with ``fan_in_fan_out=True``.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from safetensors.torch import save_file


class TinyMLP(torch.nn.Module):
    """64 -> 32 -> 10 with a tanh between; ``fc1``/``fc2`` are Linear or GPT-2 Conv1D."""

    def __init__(self, kind: str = "linear"):
        super().__init__()
        if kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            self.fc1, self.fc2 = Conv1D(32, 64), Conv1D(10, 32)
        else:
            self.fc1, self.fc2 = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def _train(model, params, steps: int, lr: float, on_step=None, seed: int = 0) -> None:
    """AdamW on digits batches of 64, on one thread (a tiny model: threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _steps(model, params, steps, lr, on_step, seed)
    finally:
        torch.set_num_threads(threads)


def _steps(model, params, steps: int, lr: float, on_step, seed: int) -> None:
    x, y = digits()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step:
            on_step(step, loss.item())


def write_lora_series(
    root,
    kind: str = "linear",
    rslora: bool = False,
    steps: int = 24,
    every: int = 3,
    patterns: bool = False,
) -> tuple[Path, Path, TinyMLP]:
    """(run folder, base model file, base model). The base is pre-trained 30 steps, then
    LoRA (r=4, alpha=8 on fc1 and fc2; ``patterns``: fc2 with r=2, alpha=32 through PEFT's
    rank_pattern / alpha_pattern) trains ``steps`` steps with AdamW at 1e-2, saving the
    adapter every ``every`` steps and logging loss and learning rate to log.csv."""
    from peft import LoraConfig, get_peft_model

    root = Path(root)
    torch.manual_seed(0)
    base = TinyMLP(kind)
    _train(base, base.parameters(), 30, 1e-2, seed=1)
    base_file = root / "base" / "model.safetensors"
    base_file.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_file))
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["fc1", "fc2"],
        use_rslora=rslora,
        fan_in_fan_out=kind == "conv1d",
        rank_pattern={"fc2": 2} if patterns else {},
        alpha_pattern={"fc2": 32} if patterns else {},
    )
    model = get_peft_model(copy.deepcopy(base), config)
    run = root / "run"
    lines = ["step,loss,lr"]

    def save(step, loss):
        lines.append(f"{step},{loss},0.01")
        if step % every == 0:
            model.save_pretrained(str(run / f"checkpoint-{step}"))

    trainable = [p for p in model.parameters() if p.requires_grad]
    _train(model, trainable, steps, 1e-2, on_step=save, seed=2)
    (run / "log.csv").write_text("\n".join(lines) + "\n")
    return run, base_file, base


def merged_weights(base: TinyMLP, adapter_dir) -> dict[str, torch.Tensor]:
    """The fine-tuned model's weights by PEFT itself: adapter loaded, ``merge_and_unload``."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
