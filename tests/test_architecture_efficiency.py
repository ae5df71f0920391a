"""Efficiencies with clear meanings: which tensors feed an activation (from config.json and the
architecture's names), Carnot pairs in signal order with both T identified, and the realized
efficiency over a physical heat. Known answers and the refusals, each with its reason."""

import json

import numpy as np
import pytest
import xarray as xr

from pipeline.core.manifest import TensorInfo
from pipeline.core.reasons import EfficiencyReason as E
from pipeline.estimators.efficiency import realized_efficiency, released_heat
from pipeline.ingest.architecture import NO_ACTIVATION, activation_after, signal_partners
from pipeline.ingest.training_log import read_activations
from pipeline.thermo.run import add_efficiency

GPT2 = {
    "transformer.wte.weight": (50, 8),
    "transformer.h.0.attn.c_attn.weight": (8, 24),
    "transformer.h.0.attn.c_proj.weight": (8, 8),
    "transformer.h.0.mlp.c_fc.weight": (8, 32),
    "transformer.h.0.mlp.c_fc.bias": (32,),
    "transformer.h.0.mlp.c_proj.weight": (32, 8),
    "lm_head.weight": (50, 8),
}
LLAMA_BLOCK = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama_names(blocks=2):
    names = ["model.embed_tokens.weight"]
    for b in range(blocks):
        names += [f"model.layers.{b}.self_attn.{p}.weight" for p in LLAMA_BLOCK[:4]]
        names += [f"model.layers.{b}.mlp.{p}.weight" for p in LLAMA_BLOCK[4:]]
    return sorted(names) + ["lm_head.weight"]  # name order: mlp before self_attn


@pytest.mark.parametrize(
    "name,expected",
    [
        ("transformer.h.3.mlp.c_fc.weight", "gelu_new"),  # GPT-2
        ("transformer.h.3.attn.c_attn.weight", NO_ACTIVATION),
        ("transformer.h.3.mlp.c_proj.weight", NO_ACTIVATION),
        ("model.layers.0.mlp.gate_proj.weight", "gelu_new"),  # Llama
        ("model.layers.0.mlp.up_proj.weight", "gelu_new"),
        ("model.layers.0.self_attn.q_proj.weight", NO_ACTIVATION),
        ("model.layers.0.mlp.down_proj.weight", NO_ACTIVATION),
        ("bert.encoder.layer.1.intermediate.dense.weight", "gelu_new"),  # BERT
        ("bert.encoder.layer.1.attention.self.query.weight", NO_ACTIVATION),
        ("bert.encoder.layer.1.output.dense.weight", NO_ACTIVATION),
        ("model.embed_tokens.weight", NO_ACTIVATION),
        ("lm_head.weight", NO_ACTIVATION),
        ("some.custom.block.weight", None),  # no rule: unknown, no claim
    ],
)
def test_activation_after_follows_the_architecture(name, expected):
    assert activation_after(name, True, "gelu_new") == expected
    assert activation_after(name, False, "gelu_new") is None  # 1-D: never an engine


def test_config_activation_only_on_tensors_that_feed_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"activation_function": "gelu_new"}))
    tensors = [TensorInfo(n, shape, "F32") for n, shape in GPT2.items()]
    acts = read_activations(tmp_path, tensors)
    assert acts["transformer.h.0.mlp.c_fc.weight"] == "gelu_new"
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "lm_head.weight"):
        assert acts[name] == NO_ACTIVATION
    assert "transformer.h.0.mlp.c_fc.bias" not in acts


def test_signal_partners_llama_and_demo():
    names = _llama_names()
    partner = signal_partners(names, [False] * len(names))
    got = {names[i]: (names[p] if p >= 0 else None) for i, p in enumerate(partner)}
    b0, b1 = "model.layers.0.", "model.layers.1."
    assert got["model.embed_tokens.weight"] == b0 + "self_attn.k_proj.weight"
    for p in ("q_proj", "k_proj", "v_proj"):  # parallel siblings: all feed o_proj
        assert got[b0 + f"self_attn.{p}.weight"] == b0 + "self_attn.o_proj.weight"
    assert got[b0 + "self_attn.o_proj.weight"] in (
        b0 + "mlp.gate_proj.weight",
        b0 + "mlp.up_proj.weight",
    )
    assert got[b0 + "mlp.gate_proj.weight"] == b0 + "mlp.down_proj.weight"
    assert got[b0 + "mlp.down_proj.weight"].startswith(b1 + "self_attn.")
    assert got[b1 + "mlp.down_proj.weight"] == "lm_head.weight"
    assert got["lm_head.weight"] is None
    demo = [
        "layers.0.bias",
        "layers.0.weight",
        "layers.1.bias",
        "layers.1.weight",
        "layers.2.weight",
    ]
    vec = [n.endswith("bias") for n in demo]
    assert signal_partners(demo, vec) == [-1, 3, -1, 4, -1]


def test_released_heat_and_realized_efficiency_known_answer():
    # n = 2 valley directions cooling from T = 2 to 1 release 2/2 * 1 = 1; W = 3 -> 3 / 4
    assert released_heat(2.0, 1.0, 2) == 1.0
    assert realized_efficiency(3.0, released_heat(2.0, 1.0, 2)) == 0.75


def _efficiency_dataset():
    """Four layers in name order: relu MLP input, attention (no activation), 1-D bias, and an
    unknown tensor; T identified everywhere except layer 'c' at the last step."""
    layers = [
        "a.layers.0.mlp.fc1.weight",
        "a.layers.0.self_attn.q_proj.weight",
        "a.layers.0.mlp.fc1.bias",
        "a.layers.1.custom.weight",
    ]
    steps = np.arange(4) * 10
    temp = np.array(
        [
            [2.0, 4.0, np.nan, 1.0],
            [1.8, 4.0, np.nan, 1.0],
            [1.5, 4.0, np.nan, 1.0],
            [1.0, 4.0, np.nan, np.nan],
        ]
    )
    work = np.array(
        [[np.nan] * 4, [1.0, 0.0, np.nan, 0.0], [1.0, 0.0, np.nan, 0.0], [1.0, 0.0, np.nan, 0.0]]
    )
    return xr.Dataset(
        {
            "temperature": (("step", "layer"), temp),
            "work": (("step", "layer"), work),
            "weight_rms": (("step", "layer"), np.full((4, 4), 0.1)),
        },
        coords={
            "step": steps,
            "layer": layers,
            "activation": ("layer", ["relu", NO_ACTIVATION, "unknown", "unknown"]),
            "is_vector": ("layer", [False, False, True, False]),
            "fan_in": ("layer", [100, 100, 1, 100]),
            "n_params": ("layer", [2, 2, 2, 2]),
        },
    )


def test_efficiencies_only_where_their_conditions_hold():
    ds = add_efficiency(_efficiency_dataset())
    eff, why = ds.work_efficiency.values, ds.work_efficiency_reason.values
    np.testing.assert_allclose(eff[:, 0], 0.5, atol=1e-12)  # ReLU: 1/2 at any scale
    assert np.isnan(eff[:, 1:]).all()
    assert list(why) == [E.OK, E.NO_ACTIVATION, E.VECTOR, E.ACTIVATION_UNKNOWN]
    assert list(ds.engine_type.values) == ["scale-free", NO_ACTIVATION, "unknown", "unknown"]
    # signal order: q_proj (position 1) -> fc1 (3) -> layers.1 tensor; the bias has no pair
    carnot, creason = ds.carnot_efficiency.values, ds.carnot_efficiency_reason.values
    np.testing.assert_allclose(carnot[:3, 1], 1 - np.array([2.0, 1.8, 1.5]) / 4.0)
    np.testing.assert_allclose(carnot[:3, 0], 1 - 1.0 / np.array([2.0, 1.8, 1.5]))
    assert np.isnan(carnot[3, 0]) and creason[3, 0] == E.NO_TEMPERATURE  # partner masked
    assert (creason[:, 2] == E.VECTOR).all() and (creason[:, 3] == E.NO_PARTNER).all()
    # realized: fc1 cools 2 -> 1 (Q = 1) with W = 3 -> 0.75; q_proj W = 0 -> refused
    real, rreason = ds.realized_efficiency.values, ds.realized_efficiency_reason.values
    assert real[0] == pytest.approx(0.75) and rreason[0] == E.OK
    assert np.isnan(real[1]) and rreason[1] == E.NO_HEAT
    assert np.isnan(real[2]) and rreason[2] == E.NO_TEMPERATURE
