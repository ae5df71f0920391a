"""Training logs (trainer_state.json, CSV, JSONL) and activations from config.json."""

import json
import math

import checkpoint_factory as cf
import pytest

from pipeline.core.errors import InputError
from pipeline.core.manifest import TensorInfo
from pipeline.ingest.training_log import read_activations, read_training_log


def _nan_equal(a, b):
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b)
    )


def test_trainer_state_of_latest_checkpoint(tmp_path):
    cf.write_trainer(tmp_path, [30, 10, 20])
    log = read_training_log(tmp_path)
    assert log.source == str(tmp_path / "checkpoint-30" / "trainer_state.json")
    assert log.step == [10, 20, 30]
    assert log.loss == [1 / 11, 1 / 21, 1 / 31]
    assert log.learning_rate == [0.1 / 11, 0.1 / 21, 0.1 / 31]


def test_top_level_trainer_state_wins_and_entries_merge(tmp_path):
    cf.write_trainer(tmp_path, [1, 2])
    hist = [
        {"step": 1, "learning_rate": 0.5},
        {"step": 1, "loss": 3.0},
        {"step": 1, "eval_loss": 9.0},
        {"step": 2, "loss": 2.0},
        {"step": 2, "train_loss": 7.0, "train_runtime": 1.0},
    ]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": hist}))
    log = read_training_log(tmp_path)
    assert log.source == str(tmp_path / "trainer_state.json")
    assert log.step == [1, 2] and log.loss == [3.0, 2.0]
    assert _nan_equal(log.learning_rate, [0.5, math.nan])


@pytest.mark.parametrize("lr_col", ["lr", "learning_rate"])
def test_csv_log(tmp_path, lr_col):
    (tmp_path / "log.csv").write_text(
        f"step,loss,{lr_col}\n0,2.5,0.1\n100,1.5,\n100,,0.05\n50,2.0,0.08\n"
    )
    log = read_training_log(tmp_path)
    assert log.step == [0, 50, 100]
    assert log.loss == [2.5, 2.0, 1.5] and log.learning_rate == [0.1, 0.08, 0.05]
    assert log.source == str(tmp_path / "log.csv")


def test_jsonl_log(tmp_path):
    lines = [
        '{"step": 1, "loss": 1.0, "lr": 0.3}',
        "",
        '{"step": 2, "loss": 0.5}',
        '{"note": "no step"}',
    ]
    (tmp_path / "log.jsonl").write_text("\n".join(lines))
    log = read_training_log(tmp_path)
    assert log.step == [1, 2] and log.loss == [1.0, 0.5]
    assert _nan_equal(log.learning_rate, [0.3, math.nan])


def test_other_csv_is_used_only_when_it_looks_like_a_log(tmp_path):
    (tmp_path / "a_results.csv").write_text("model,accuracy\nx,0.9\n")
    (tmp_path / "metrics.csv").write_text("step,loss\n5,0.25\n")
    log = read_training_log(tmp_path)
    assert log.step == [5] and log.source == str(tmp_path / "metrics.csv")


def test_missing_log_is_empty(tmp_path):
    log = read_training_log(tmp_path)
    assert log.step == [] and log.source is None


@pytest.mark.parametrize(
    "fname,text,why",
    [
        ("trainer_state.json", "{not json", "cannot parse JSON"),
        ("trainer_state.json", '{"global_step": 3}', "log_history"),
        ("log.csv", "step,loss\n1,abc\n", "line 2: expected a number"),
        ("log.csv", "step,loss\n1.5,0.3\n", "not a non-negative integer"),
        ("log.jsonl", '{"step": 1, "loss": 1}\n{broken\n', "line 2: not valid JSON"),
        ("log.jsonl", "[1, 2]\n", "line 1: not a JSON object"),
    ],
)
def test_unparseable_log_names_the_file(tmp_path, fname, text, why):
    (tmp_path / fname).write_text(text)
    with pytest.raises(InputError) as e:
        read_training_log(tmp_path)
    assert str(tmp_path / fname) in str(e.value) and why in str(e.value)


TENSORS = [
    TensorInfo("embed.weight", (10, 4), "F32"),
    TensorInfo("layers.1.weight", (4, 4), "F32"),
    TensorInfo("layers.1.bias", (4,), "F32"),
    TensorInfo("layers.10.weight", (4, 4), "F32"),
    TensorInfo("norm.weight", (4,), "F32"),
]


def _config(tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))


def test_hf_activation_applies_to_matrices(tmp_path):
    """The model's activation goes only to the matrices that feed it (ingest/architecture.py);
    names no rule covers stay unknown (absent)."""
    _config(tmp_path, {"hidden_act": "gelu_new"})
    assert read_activations(tmp_path, TENSORS) == {}
    gpt2 = ["h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.bias", "h.0.attn.c_attn.weight", "wte.weight"]
    assert read_activations(tmp_path, gpt2) == {
        "h.0.mlp.c_fc.weight": "gelu_new",
        "h.0.attn.c_attn.weight": "none",
        "wte.weight": "none",
    }


@pytest.mark.parametrize("key", ["activation_function", "hidden_activation"])
def test_other_hf_keys(tmp_path, key):
    _config(tmp_path, {key: "relu"})
    assert read_activations(tmp_path, ["layers.1.mlp.up_proj.weight"]) == {
        "layers.1.mlp.up_proj.weight": "relu"
    }


def test_thermoscope_activations_priority_prefix_and_glob(tmp_path):
    _config(
        tmp_path,
        {
            "hidden_act": "gelu",
            "thermoscope_activations": {
                "layers.1": "tanh",
                "layers.1.bias": "identity",
                "norm.*": "none",
                "embed.weight": "linear",
            },
        },
    )
    acts = read_activations(tmp_path, TENSORS)
    assert acts == {
        "embed.weight": "linear",
        "layers.1.weight": "tanh",
        "layers.1.bias": "identity",
        "norm.weight": "none",
    }  # layers.10.weight: no architecture rule says it feeds gelu -> unknown (absent)


def test_bare_names_use_weight_suffix(tmp_path):
    _config(tmp_path, {"hidden_act": "silu"})
    names = ["a.mlp.fc1.weight", "a.mlp.fc1.bias"]
    assert read_activations(tmp_path, names) == {"a.mlp.fc1.weight": "silu"}


def test_config_in_latest_checkpoint(tmp_path):
    cf.write_trainer(tmp_path, [1], hidden_act="relu")
    assert read_activations(tmp_path, ["h.0.mlp.c_fc.weight"])["h.0.mlp.c_fc.weight"] == "relu"


def test_no_config_and_bad_config(tmp_path):
    assert read_activations(tmp_path, TENSORS) == {}
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(InputError, match="config.json: cannot parse JSON"):
        read_activations(tmp_path, TENSORS)
    _config(tmp_path, {"thermoscope_activations": ["relu"]})
    with pytest.raises(InputError, match="thermoscope_activations"):
        read_activations(tmp_path, TENSORS)
