"""The state id -> tensor mapping on a series written by the real Hugging Face Trainer: a tiny
GPT-2 (tied input/output embeddings) trained with AdamW on the bytes of a stdlib module."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pipeline.ingest.discovery import discover  # noqa: E402

BLOCK = 32


class _Bytes(torch.utils.data.Dataset):
    def __init__(self):
        text = inspect.getsource(json.decoder).encode()
        n = len(text) // BLOCK * BLOCK
        self.ids = torch.tensor(list(text[:n]), dtype=torch.long).reshape(-1, BLOCK)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer") / "gpt2"
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2
    )
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=30,
        save_steps=10,
        logging_steps=5,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        weight_decay=0.01,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Bytes())
    trainer.train()
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]]
    return out, order


@pytest.mark.slow
def test_mapping_matches_the_trainers_optimizer(trainer_run):
    out, order = trainer_run
    run = discover(out).runs[0]
    opt = run.optimizer
    assert opt["kind"] == "adamw" and opt["note"] == ""
    assert opt["mapping_source"].startswith("transformers (Trainer decay/no-decay order)")
    # exactly the Trainer's own order: id i is the i-th parameter of its param groups
    assert opt["mapping"] == {name: i for i, name in enumerate(order)}
    # tied embeddings: one tensor in the file, one optimizer entry, no lm_head
    assert "lm_head.weight" not in opt["mapping"] and "transformer.wte.weight" in opt["mapping"]
    assert len(opt["mapping"]) == len(run.tensors) == len(order)
    check = opt["mapping_check"]
    assert check["verified"] >= 8 and check["swaps_tested"] > 0
    # the Trainer's two groups: decay weights, then biases and LayerNorm parameters
    assert opt["group"]["transformer.h.0.attn.c_attn.weight"] == 0
    assert opt["group"]["transformer.h.0.ln_1.weight"] == 1
    assert run.checkpoints[-1].optimizer["groups"][0]["weight_decay"] == pytest.approx(0.01)
    assert run.checkpoints[-1].optimizer["step"] == 30


@pytest.mark.slow
def test_without_config_the_shapes_are_ambiguous(trainer_run, tmp_path):
    out, _ = trainer_run
    copy = tmp_path / "gpt2"
    shutil.copytree(out, copy)
    for config in copy.glob("checkpoint-*/config.json"):
        config.unlink()
    note = discover(copy).runs[0].optimizer["note"]
    assert "cannot tell which optimizer state belongs to which tensor" in note
    assert "transformer.h.0" in note and "falls back to D" in note
