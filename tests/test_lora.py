"""LoRA / PEFT adapter series: the analysed update dW = s B A (and W0 + dW) against PEFT's own
merged weights (merge_and_unload) of a real fine-tune, and the series analysed end to end."""

import json
import math

import lora_factory as lf
import pytest
import torch

from pipeline.core.errors import InputError
from pipeline.ingest.lora import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    adapter_tensors,
    load_base_model,
    lora_part,
    read_adapter_config,
)
from pipeline.ingest.safetensors_io import read_block, tensor_infos

# float32 matmul of a rank-4 product: PEFT merges with the same fp32 arithmetic in another
# order, so the two agree to a few ulps of the weights
REL_TOL = 1e-6


@pytest.fixture(scope="module", params=[("linear", False), ("linear", True), ("conv1d", False)])
def series(request, tmp_path_factory):
    kind, rslora = request.param
    root = tmp_path_factory.mktemp(f"lora_{kind}_{rslora}")
    run, base_file, base = lf.write_lora_series(root, kind=kind, rslora=rslora)
    return run, base_file, base


def _layers(ckpt, base_file=None, raw=False):
    cfg = read_adapter_config(ckpt / ADAPTER_CONFIG)
    base = load_base_model(base_file) if base_file else None
    return adapter_tensors(tensor_infos(ckpt / ADAPTER_FILE), cfg, base, raw)


def _read(ckpt, tensor, blocks=3):
    """The whole tensor through read_block, in row blocks (as the measurement reads it)."""
    rows = tensor.shape[0]
    edges = [round(i * rows / blocks) for i in range(blocks + 1)]
    parts = []
    for a, b in zip(edges, edges[1:]):
        out = torch.empty((b - a) * tensor.shape[1])
        parts.append(read_block(str(ckpt / ADAPTER_FILE), tensor, a, b, out=out).reshape(b - a, -1))
    return torch.cat(parts)


def test_update_matches_peft_merge(series):
    run, base_file, base = series
    w0 = {k: v.detach() for k, v in base.state_dict().items()}
    worst = 0.0
    ckpts = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for ckpt in (ckpts[0], ckpts[-1]):  # first save and last
        merged = lf.merged_weights(base, ckpt)
        delta = {t.name: t for t in _layers(ckpt)}
        full = {t.name: t for t in _layers(ckpt, base_file)}
        assert sorted(delta) == ["fc1.delta_weight", "fc2.delta_weight"]
        for m in ("fc1", "fc2"):
            want = merged[f"{m}.weight"] - w0[f"{m}.weight"]
            got = _read(ckpt, delta[f"{m}.delta_weight"])
            scale = float(w0[f"{m}.weight"].abs().max())
            worst = max(worst, float((got - want).abs().max()) / scale)
            assert float(want.abs().max()) > 1e-4  # trained: the update is not zero
            got_full = _read(ckpt, full[f"{m}.weight"])
            assert float((got_full - merged[f"{m}.weight"]).abs().max()) <= REL_TOL * scale
    print(f"max |dW - (merged - W0)| / max|W0| = {worst:.2e}")
    assert worst <= REL_TOL, worst


def test_scale_and_labels(series):
    run, base_file, _ = series
    ckpt = sorted(run.glob("checkpoint-*"))[0]
    cfg = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    want = 8 / math.sqrt(4) if cfg["use_rslora"] else 8 / 4
    layers = _layers(ckpt, raw=True)
    virtual = [t for t in layers if t.source]
    assert all(t.source.scale == want for t in virtual)
    assert [lora_part(t) for t in layers[:3]] == ["dW", "A", "B"]
    assert lora_part(_layers(ckpt, base_file)[0]) == "W0+dW"
    fc1 = next(t for t in virtual if t.name.startswith("fc1"))
    assert fc1.shape == ((64, 32) if cfg["fan_in_fan_out"] else (32, 64))


def test_bad_adapter_config_and_missing_base_weight(tmp_path, series):
    run, _, _ = series
    ckpt = sorted(run.glob("checkpoint-*"))[0]
    bad = tmp_path / ADAPTER_CONFIG
    for text, why in [
        ("{oops", "cannot parse JSON"),
        (json.dumps({"r": 4, "lora_alpha": 8, "use_dora": True}), "DoRA"),
        (json.dumps({"r": 0, "lora_alpha": 8}), "r 0 is not a positive integer"),
        (json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "IA3"}), "only LoRA"),
    ]:
        bad.write_text(text)
        with pytest.raises(InputError, match=why):
            read_adapter_config(bad)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"unrelated.weight": torch.zeros(3, 3)}, str(other))
    with pytest.raises(InputError, match="no base weight for the adapted module 'fc1'"):
        _layers(ckpt, other)
