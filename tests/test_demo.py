"""The demo series: real SGD training on scikit-learn digits, written in the Trainer layout."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline import demo
from pipeline.core.errors import InputError
from pipeline.demo import (
    ConstantLR,
    DigitsMLP,
    WarmupConstantDecay,
    digits_dataset,
    evaluate,
    make_demo,
    train_digits_run,
)

RUNS = ["adamw_lr_0.001", "lr_0.01", "lr_0.03", "lr_0.1", "lr_0.3", "schedule"]
KEYS = [
    "layers.0.bias",
    "layers.0.weight",
    "layers.1.bias",
    "layers.1.weight",
    "layers.2.bias",
    "layers.2.weight",
]


@pytest.fixture(scope="module")
def quick_root(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo") / "demo", quick=True)


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_digits_dataset_is_standardized_split():
    d = digits_dataset()
    assert d.x_train.shape == (1347, 64) and d.x_test.shape == (450, 64)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    std = d.x_train.std(dim=0, unbiased=False)
    varying = std > 0
    assert torch.allclose(d.x_train.mean(dim=0), torch.zeros(64), atol=1e-5)
    assert torch.allclose(std[varying], torch.ones(int(varying.sum())), atol=1e-5)
    assert set(d.y_test.tolist()) == set(range(10))
    d.x_train.zero_()  # callers get fresh tensors
    assert digits_dataset().x_train.abs().sum() > 0


def test_label_noise_flips_a_fixed_fraction_of_training_labels():
    clean, noisy, again = digits_dataset(), digits_dataset(0.2), digits_dataset(0.2)
    flipped = clean.y_train != noisy.y_train
    assert int(flipped.sum()) == round(0.2 * len(clean.y_train))  # every chosen label changes
    assert torch.equal(noisy.y_train, again.y_train)  # same noise for every run
    assert torch.equal(clean.y_test, noisy.y_test) and torch.equal(clean.x_train, noisy.x_train)
    assert noisy.y_train.min() >= 0 and noisy.y_train.max() <= 9


def test_layout_is_real_trainer_series(quick_root):
    assert sorted(p.name for p in quick_root.iterdir() if p.is_dir()) == RUNS
    marker = json.loads((quick_root / "demo.json").read_text())
    assert marker["quick"] is True and marker["n_steps"] == 100
    for run in RUNS:
        run_dir = quick_root / run
        config = json.loads((run_dir / "config.json").read_text())
        assert config["thermoscope_activations"] == {
            "layers.0": "tanh",
            "layers.1": "relu",
            "layers.2": "identity",
        }
        assert config["thermoscope_label_noise"] == marker["label_noise"] == 0.2
        steps = _steps(run_dir)
        assert steps == list(range(0, 101, 10))
        for step in steps:
            ckpt = run_dir / f"checkpoint-{step}"
            with safe_open(ckpt / "model.safetensors", framework="pt") as f:
                assert f.metadata()["step"] == str(step)
                assert sorted(f.keys()) == KEYS
                assert f.get_tensor("layers.0.weight").shape == (64, 64)
                assert f.get_tensor("layers.2.weight").shape == (10, 32)
            state = json.loads((ckpt / "trainer_state.json").read_text())
            assert state["global_step"] == step
            optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
            kind = "betas" if run.startswith("adamw") else "momentum"
            assert all(kind in g for g in optimizer["param_groups"])
            logged = [e["step"] for e in state["log_history"]]
            assert logged == [s for s in steps if s <= step]
            for e in state["log_history"]:
                assert math.isfinite(e["loss"]) and e["learning_rate"] >= 0


def test_training_learns_and_log_is_full_batch_loss(quick_root):
    run_dir = quick_root / "lr_0.3"
    history = json.loads((run_dir / "checkpoint-100" / "trainer_state.json").read_text())[
        "log_history"
    ]
    data = digits_dataset(label_noise=0.2)  # the demo's training labels
    model = DigitsMLP()
    for entry in (history[0], history[-1]):
        model.load_state_dict(
            load_file(run_dir / f"checkpoint-{entry['step']}" / "model.safetensors")
        )
        loss, _ = evaluate(model, data.x_train, data.y_train)
        assert loss == pytest.approx(entry["loss"], rel=1e-6)
    _, acc = evaluate(model, data.x_test, data.y_test)  # final checkpoint, clean held-out digits
    assert history[0]["loss"] == pytest.approx(math.log(10), abs=0.1)  # init: near-uniform guess
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]  # measured 1.01 vs 2.30 at step 100
    assert acc > 0.85  # chance is 0.10; measured 0.93
    assert acc == pytest.approx(history[-1]["eval_accuracy"])


def test_logged_learning_rates_follow_schedules(quick_root):
    for run, schedule in [
        ("schedule", WarmupConstantDecay(0.1, 100)),
        ("lr_0.03", ConstantLR(0.03)),
    ]:
        history = json.loads(
            (quick_root / run / "checkpoint-100" / "trainer_state.json").read_text()
        )["log_history"]
        assert [e["learning_rate"] for e in history] == [schedule(e["step"]) for e in history]
    s = WarmupConstantDecay(0.1, 100)
    assert s(0) == pytest.approx(0.01) and s(9) == pytest.approx(0.1)  # warmup: 10 steps
    assert s(10) == s(59) == 0.1  # constant until the last 40%
    lrs = [s(t) for t in range(60, 101)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and s(100) == pytest.approx(0.001)


def test_same_seed_same_tensors(tmp_path):
    def run(name, seed):
        return train_digits_run(tmp_path / name, ConstantLR(0.1), 20, 10, seed=seed)

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    for step in (0, 10, 20):
        ta = load_file(a / f"checkpoint-{step}" / "model.safetensors")
        tb = load_file(b / f"checkpoint-{step}" / "model.safetensors")
        assert all(torch.equal(ta[k], tb[k]) for k in KEYS)
    t0a = load_file(a / "checkpoint-0" / "model.safetensors")
    t0c = load_file(c / "checkpoint-0" / "model.safetensors")
    assert not torch.equal(t0a["layers.0.weight"], t0c["layers.0.weight"])
    t20 = load_file(a / "checkpoint-20" / "model.safetensors")
    assert not torch.equal(t0a["layers.0.weight"], t20["layers.0.weight"])  # it moved


def test_uneven_steps_and_saved_dtype(tmp_path):
    run = train_digits_run(tmp_path / "r", ConstantLR(0.05), 25, 10, dtype="F16")
    assert _steps(run) == [0, 10, 20, 25]
    assert (
        load_file(run / "checkpoint-25" / "model.safetensors")["layers.1.weight"].dtype
        == torch.float16
    )


def test_second_call_does_not_rewrite(quick_root):
    before = _mtimes(quick_root)
    assert demo.main([str(quick_root), "--quick"]) == 0
    assert make_demo(quick_root, quick=True) == quick_root
    assert _mtimes(quick_root) == before


def test_changed_settings_regenerate_and_interruption_keeps_old(quick_root, tmp_path, monkeypatch):
    root = tmp_path / "demo"
    shutil.copytree(quick_root, root)
    marker = json.loads((root / "demo.json").read_text())
    marker["format"] = 0  # an older generator's demo
    (root / "demo.json").write_text(json.dumps(marker))
    before = _mtimes(root)

    real = demo.train_digits_run
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "train_digits_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_demo(root, quick=True)
    assert _mtimes(root) == before  # old demo untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp folders left

    monkeypatch.setattr(demo, "train_digits_run", real)
    make_demo(root, quick=True)
    assert json.loads((root / "demo.json").read_text())["format"] == demo.DEMO_FORMAT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    new = load_file(root / "lr_0.1" / "checkpoint-100" / "model.safetensors")
    ref = load_file(quick_root / "lr_0.1" / "checkpoint-100" / "model.safetensors")
    assert all(torch.equal(new[k], ref[k]) for k in KEYS)


def test_bad_input(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="refusing"):
        make_demo(foreign, quick=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="dtype"):
        train_digits_run(tmp_path / "a", ConstantLR(0.1), 10, 5, dtype="F8")
    with pytest.raises(InputError, match="batch_size"):
        train_digits_run(tmp_path / "b", ConstantLR(0.1), 10, 5, batch_size=0)
    with pytest.raises(InputError, match="lr_schedule"):
        train_digits_run(tmp_path / "c", lambda s: float("nan") if s == 3 else 0.1, 10, 5)
    done = train_digits_run(tmp_path / "d", ConstantLR(0.1), 5, 5)
    with pytest.raises(InputError, match="already holds"):
        train_digits_run(done, ConstantLR(0.1), 5, 5)
