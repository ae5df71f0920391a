"""Reading optimizer state: kinds, refusals with one-line notes, the id -> tensor mapping and
its verification, and the preconditioned band the kernel streams from it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.core.manifest import TensorInfo
from pipeline.ingest.discovery import discover
from pipeline.ingest.optimizer_state import (
    StateUnsupported,
    load_state,
    map_state_ids,
    optimizer_kind,
    read_run_optimizer,
    verify_mapping,
)
from pipeline.measure.graph import precond_sources
from pipeline.measure.kernel import BlockTask, measure_block
from pipeline.settings import MeasureSettings
from pipeline.testing.optim_series import QuadraticLayer, simulate_optimizer_series

LAYERS = [
    QuadraticLayer("a.weight", (32, 64), 0.5),
    QuadraticLayer("b.weight", (48, 64), 1.5),
    QuadraticLayer("c.weight", (64, 40), 3.0),
    QuadraticLayer("c.bias", (40,), 1.0),
]


@pytest.fixture(scope="module")
def adamw_series(tmp_path_factory):
    out = tmp_path_factory.mktemp("adamw") / "run"
    truth = simulate_optimizer_series(out, LAYERS, plateaus=((400, 1e-3),), save_every=40)
    return out, truth


def _saved_state(tmp_path, opt_cls, **kw):
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = opt_cls([p], lr=0.1, **kw)
    p.grad = torch.randn(8, 4)
    opt.step()
    path = tmp_path / "optimizer.pt"
    torch.save(opt.state_dict(), path)
    return str(path)


@pytest.mark.parametrize(
    ("cls", "kw", "kind"),
    [
        (torch.optim.AdamW, {"weight_decay": 0.01}, "adamw"),
        (torch.optim.Adam, {}, "adam"),
        (torch.optim.SGD, {}, "sgd"),
        (torch.optim.SGD, {"momentum": 0.9}, "sgd_momentum"),
        (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}, "nesterov"),
    ],
)
def test_kind_of_real_torch_optimizers(tmp_path, cls, kw, kind):
    path = _saved_state(tmp_path, cls, **kw)
    assert optimizer_kind(load_state(path), path) == kind


@pytest.mark.parametrize(
    ("state", "group", "what"),
    [
        ({"exp_avg": torch.zeros(3)}, {"betas": (0.9, 0.99), "lr": 1e-4}, "Lion"),
        ({"exp_avg_sq_row": torch.zeros(3), "exp_avg_sq_col": torch.zeros(2)}, {}, "Adafactor"),
        ({"state1": torch.zeros(3, dtype=torch.uint8), "qmap1": torch.zeros(256)}, {}, "8-bit"),
    ],
)
def test_unsupported_optimizers_fall_back_to_d(tmp_path, state, group, what):
    path = tmp_path / "optimizer.pt"
    torch.save({"state": {0: state}, "param_groups": [{**group, "params": [0]}]}, path)
    with pytest.raises(StateUnsupported) as err:
        optimizer_kind(load_state(str(path)), str(path))
    msg = str(err.value)
    assert what in msg and "temperature falls back to D" in msg and "\n" not in msg


class _Payload:
    """Unpickling this would run code (create a file); the safe loader must refuse it."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = str(marker)
    path = tmp_path / "optimizer.pt"
    torch.save({"state": {0: {"x": payload}}, "param_groups": []}, path)
    with pytest.raises(StateUnsupported, match="weights_only=True"):
        load_state(str(path))
    assert not marker.exists()


def test_sharded_layouts_give_one_line_note(tmp_path):
    for name, what in (("global_step40", "DeepSpeed ZeRO"), ("__0_0.distcp", "FSDP")):
        run = tmp_path / what.split()[0]
        ck = run / "checkpoint-40"
        ck.mkdir(parents=True)
        save_file({"w": torch.zeros(4, 4)}, str(ck / "model.safetensors"))
        (ck / name).mkdir() if "." not in name else (ck / name).write_bytes(b"x")
        opt, per_ckpt = read_run_optimizer(
            str(run), [{"w": str(ck / "model.safetensors")}], [TensorInfo("w", (4, 4), "F32")]
        )
        assert what in opt["note"] and "falls back to D" in opt["note"]
        assert opt["kind"] == "unknown" and per_ckpt == [{}]


def test_series_mapping_kind_and_hyperparameters(adamw_series):
    out, truth = adamw_series
    run = discover(out).runs[0]
    opt = run.optimizer
    assert opt["kind"] == "adamw" and opt["evidence"] == "state" and opt["note"] == ""
    # torch.optim ids follow the param groups: decay (2-D weights) then no-decay (bias)
    assert opt["mapping"] == {"a.weight": 0, "b.weight": 1, "c.weight": 2, "c.bias": 3}
    assert opt["group"] == {"a.weight": 0, "b.weight": 0, "c.weight": 0, "c.bias": 1}
    assert opt["mapping_check"]["verified"] == 3 and opt["mapping_check"]["too_small"] == 1
    assert opt["mapping_check"]["min_z"] > 4
    last = run.checkpoints[-1].optimizer
    assert last["step"] == run.checkpoints[-1].step
    assert last["groups"][0]["lr"] == pytest.approx(1e-3)
    assert last["groups"][0]["beta2"] == pytest.approx(0.999)


def test_ambiguous_shapes_are_refused_naming_the_tensors(tmp_path):
    layers = [QuadraticLayer("x.weight", (32, 32), 1.0), QuadraticLayer("y.weight", (32, 32), 2.0)]
    out = tmp_path / "run"
    simulate_optimizer_series(out, layers, plateaus=((80, 1e-3),), save_every=40)
    run = discover(out).runs[0]
    note = run.optimizer["note"]
    assert "x.weight" in note and "y.weight" in note and "falls back to D" in note
    assert run.optimizer["kind"] == "unknown"
    # the mapping, if given, is checked: swapped ids fail, the true order passes
    path = str(out / "checkpoint-80" / "optimizer.pt")
    sd = load_state(path)
    tensors = run.tensors
    before, after = run.checkpoints[0].files, run.checkpoints[1].files
    good = verify_mapping({"x.weight": 0, "y.weight": 1}, sd, path, tensors, before, after)
    assert good["verified"] == 2
    with pytest.raises(StateUnsupported, match="x.weight.*y.weight|y.weight.*x.weight"):
        verify_mapping({"x.weight": 1, "y.weight": 0}, sd, path, tensors, before, after)


def test_safetensors_optimizer_file(tmp_path, adamw_series):
    out, _ = adamw_series
    src = out / "checkpoint-400"
    ck = tmp_path / "run" / "checkpoint-400"
    ck.mkdir(parents=True)
    save_file(load_file(str(src / "model.safetensors")), str(ck / "model.safetensors"))
    sd = torch.load(src / "optimizer.pt", weights_only=True)
    flat = {
        f"state.{i}.{k}": v.reshape(v.shape) for i, e in sd["state"].items() for k, v in e.items()
    }
    groups = json.dumps(sd["param_groups"])
    save_file(flat, str(ck / "optimizer.safetensors"), metadata={"param_groups": groups})
    run = discover(tmp_path / "run").runs[0]
    assert run.optimizer["kind"] == "adamw"
    assert run.optimizer["mapping"]["c.weight"] == 2
    assert run.checkpoints[0].optimizer["file"].endswith("optimizer.safetensors")


def test_precond_band_equals_brute_force_with_later_end_p(adamw_series):
    """sum_i P_i (theta_t - theta_{t-k})^2 with P from checkpoint t (the later end), through
    several cache slices and a resumed task."""
    out, _ = adamw_series
    run = discover(out).runs[0]
    tensor = next(t for t in run.tensors if t.name == "b.weight")
    files = tuple(c.files[tensor.name] for c in run.checkpoints)
    precond = precond_sources(run, tensor.name)
    settings = MeasureSettings(max_lag=4, ensemble_window=4, slice_elems=640)
    theta = [load_file(f)["b.weight"].double() for f in files]
    p = []
    for c in run.checkpoints:
        sd = torch.load(c.optimizer["file"], weights_only=True)
        st = sd["state"][1]
        v_hat = st["exp_avg_sq"].double() / (1 - 0.999 ** float(st["step"]))
        p.append(v_hat.sqrt() + 1e-8)
    for resume in (0, 6):
        task = BlockTask(run.name, tensor, 0, tensor.rows, files, tuple(run.steps), resume, precond)
        got = measure_block(task, settings)["sq_distance_precond"]
        for j, t in enumerate(range(resume, len(files))):
            for k in range(1, 5):
                want = float((p[t] * (theta[t] - theta[t - k]) ** 2).sum()) if t >= k else np.nan
                np.testing.assert_allclose(got[j, k - 1], want, rtol=2e-5, equal_nan=True)
    # the earlier end's P would give a different number (the choice is visible)
    t = len(files) - 1
    earlier = float((p[t - 1] * (theta[t] - theta[t - 1]) ** 2).sum())
    assert abs(earlier / got[-1, 0] - 1) > 1e-4
    assert os.path.basename(run.checkpoints[-1].optimizer["file"]) == "optimizer.pt"


def test_map_state_ids_by_shapes_needs_equal_counts(adamw_series):
    out, _ = adamw_series
    path = str(out / "checkpoint-400" / "optimizer.pt")
    sd = load_state(path)
    tensors = [TensorInfo("a.weight", (32, 64), "F32"), TensorInfo("b.weight", (48, 64), "F32")]
    with pytest.raises(StateUnsupported, match="4 ids for 2 tensors|c.weight|falls back"):
        map_state_ids(sd, path, tensors, str(out))
