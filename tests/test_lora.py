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
from pipeline.testing.compare import relative_difference

# float32 matmul of a rank-4 product: PEFT merges with the same fp32 arithmetic in another
# order, so the two agree to a few ulps of the weights
REL_TOL = 1e-6


SERIES = [  # (kind, rslora, rank/alpha patterns)
    ("linear", False, False),
    ("linear", True, False),
    ("conv1d", False, False),
    ("linear", False, True),
]


@pytest.fixture(scope="module", params=SERIES, ids=["lora", "rslora", "conv1d", "patterns"])
def series(request, tmp_path_factory):
    kind, rslora, patterns = request.param
    root = tmp_path_factory.mktemp(f"lora_{kind}_{rslora}_{patterns}")
    return lf.write_lora_series(root, kind=kind, rslora=rslora, patterns=patterns)


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
    layers = _layers(ckpt, raw=True)
    virtual = {t.name.split(".")[0]: t for t in layers if t.source}
    for module, t in virtual.items():
        r = cfg["rank_pattern"].get(module, cfg["r"])
        alpha = cfg["alpha_pattern"].get(module, cfg["lora_alpha"])
        assert t.source.rank == r
        assert t.source.scale == (alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r)
    assert [lora_part(t) for t in layers[:3]] == ["dW", "A", "B"]
    assert lora_part(_layers(ckpt, base_file)[0]) == "W0+dW"
    fc1 = virtual["fc1"]
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


# ------------------------------------------------------------------ end to end

MEASURED = ("weight_mean", "weight_rms", "weight_entropy", "sq_distance", "msd")


@pytest.fixture(scope="module")
def linear_series(tmp_path_factory):
    """The Linear fine-tune, plus PEFT's merged weights at every saved step written as a plain
    flat series (the reference: what a full fine-tune's checkpoints would hold)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("lora_e2e")
    run, base_file, base = lf.write_lora_series(root)
    (root / "merged").mkdir()
    for ckpt in sorted(run.glob("checkpoint-*")):
        merged = lf.merged_weights(base, ckpt)
        step = int(ckpt.name.split("-")[1])
        weights = {k: merged[k].contiguous() for k in ("fc1.weight", "fc2.weight")}
        save_file(weights, str(root / "merged" / f"step_{step:04d}.safetensors"))
    return run, base_file, root / "merged"


def _node(store):
    import xarray as xr

    tree = xr.open_datatree(store, engine="zarr")
    (name,) = list(tree.children)
    return tree[name].to_dataset()


def test_series_analysed_end_to_end(tmp_path, linear_series, dask_cluster):
    """analyze() on the adapter series with the base model gives the store of the merged
    checkpoints; without the base, the layers are dW, labelled as such; lora_raw adds A, B."""
    from pipeline.analyze import analyze
    from pipeline.ingest.discovery import discover
    from pipeline.settings import ClusterSettings, MeasureSettings

    run, base_file, merged = linear_series
    settings = MeasureSettings(max_lag=2, entropy_sample=512, ensemble_window=4, block_elems=256)
    cluster = ClusterSettings(scheduler_address=dask_cluster.scheduler_address)
    full = _node(analyze(run, tmp_path / "full.zarr", settings, cluster, base_model=base_file))
    ref = _node(analyze(merged, tmp_path / "ref.zarr", settings, cluster))
    assert list(full.layer.values) == ["fc1.weight", "fc2.weight"] == list(ref.layer.values)
    assert list(full.step.values) == list(range(3, 25, 3)) == list(ref.step.values)
    assert list(full.lora_part.values) == ["W0+dW", "W0+dW"]
    assert full.attrs["lora_base"] == str(base_file)
    assert full.attrs["log_loss_key"] == "loss" and bool((full.learning_rate == 0.01).all())
    for var in MEASURED:  # NaN pattern equal, finite values within float32 rounding
        err = relative_difference(full[var].values, ref[var].values)
        print(f"{var}: LoRA W0+dW store vs merged-checkpoint store, relative difference {err:.1e}")
        assert err <= 1e-5, (var, err)
    assert "temperature" in full  # the log's LR gives temperatures
    delta = discover(run, lora_raw=True).runs[0]
    names = [t.name for t in delta.tensors]
    assert names == [
        "fc1.delta_weight",
        "base_model.model.fc1.lora_A.weight",
        "base_model.model.fc1.lora_B.weight",
        "fc2.delta_weight",
        "base_model.model.fc2.lora_A.weight",
        "base_model.model.fc2.lora_B.weight",
    ]
    dw = _node(analyze(run, tmp_path / "dw.zarr", settings, cluster, lora_raw=True))
    assert list(dw.layer.values) == names
    assert list(dw.lora_part.values) == ["dW", "A", "B"] * 2
    assert dw.attrs["lora_base"].startswith("none")
    from pipeline.report.render import render_report

    page = render_report(tmp_path / "dw.zarr", tmp_path / "report").read_text()
    assert "LoRA adapters, base model none (the adapted layers are the update dW alone)" in page
    assert "fc1.delta_weight" in page
    # the update's displacements are the merged weights' (W0 is constant): same msd
    err = float(abs(dw.msd.sel(layer="fc1.delta_weight") - ref.msd.sel(layer="fc1.weight")).max())
    assert err <= 1e-5 * float(ref.msd.sel(layer="fc1.weight").max())


def test_inconsistent_or_missing_adapter_config(tmp_path, linear_series):
    import shutil

    from pipeline.ingest.discovery import discover

    run, _, _ = linear_series
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = copy / "checkpoint-6" / ADAPTER_CONFIG
    changed = json.loads(cfg.read_text()) | {"lora_alpha": 16}
    cfg.write_text(json.dumps(changed))
    with pytest.raises(InputError, match="LoRA scale or layout differs"):
        discover(copy)
    cfg.unlink()
    with pytest.raises(InputError, match="no adapter_config.json") as e:
        discover(copy)
    assert "checkpoint-6" in str(e.value)


def test_remote_adapter_series_and_base_equal_local(tmp_path, linear_series, dask_cluster):
    """The adapter series and the base model served over HTTP (Range requests, 127.0.0.1):
    the store equals the local one's."""
    from remote_servers import http_server

    from pipeline.analyze import analyze
    from pipeline.settings import ClusterSettings, MeasureSettings
    from pipeline.store.zarr_io import open_tree
    from pipeline.testing.compare import largest_differences

    run, base_file, _ = linear_series
    settings = MeasureSettings(max_lag=2, entropy_sample=512, ensemble_window=4, block_elems=256)
    cluster = ClusterSettings(scheduler_address=dask_cluster.scheduler_address)
    local = analyze(run, tmp_path / "local.zarr", settings, cluster, base_model=base_file)
    with http_server(run.parent) as server:
        url = f"{server.url}/{run.name}"
        base_url = f"{server.url}/base"  # the base model's folder
        store = analyze(url, tmp_path / "http.zarr", settings, cluster, base_model=base_url)
        ds = _node(store)
        assert ds.attrs["lora_base"] == f"{base_url}/{base_file.name}"
        assert list(ds.lora_part.values) == ["W0+dW"] * 2
        diffs = largest_differences(open_tree(store), open_tree(local))
        assert diffs and max(v for v in diffs.values() if v == v) == 0, diffs


def test_check_lists_adapter_configs_and_plans_factor_bytes(tmp_path, linear_series):
    """`thermoscope check` on an adapter series: the configs are verdict rows, a bad one is an
    error row naming it, and the pre-flight counts A and B at each checkpoint (W0 once)."""
    import shutil

    from pipeline.ingest.validate import check_and_plan

    run, base_file, _ = linear_series
    rows, plan = check_and_plan(run, layers="fc1*")
    configs = [r for r in rows if r["path"].endswith(ADAPTER_CONFIG)]
    assert len(configs) == 8 and all(r["verdict"] == "ok" for r in configs)
    factors = (4 * 64 + 32 * 4) * 4  # fc1's A (4 x 64) and B (32 x 4), float32
    assert plan["bytes"] == 8 * factors
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoint-9" / ADAPTER_CONFIG).write_text('{"r": 4}')
    rows, plan = check_and_plan(copy)
    bad = [r for r in rows if r["verdict"] == "error"]
    assert bad and bad[0]["path"].endswith(f"checkpoint-9/{ADAPTER_CONFIG}")
    assert "lora_alpha None is not a number" in bad[0]["reason"]


def test_cache_keys_on_the_base_model(tmp_path, linear_series, dask_cluster):
    """The measurement cache never serves W0 + dW of one base model for another: a second base
    file with other values (same names and shapes) is measured anew, with the same cache."""
    from safetensors.torch import load_file, save_file

    from pipeline.analyze import analyze
    from pipeline.settings import ClusterSettings, MeasureSettings

    run, base_file, _ = linear_series
    other = tmp_path / "other_base.safetensors"
    save_file({k: 2 * v for k, v in load_file(str(base_file)).items()}, str(other))
    settings = MeasureSettings(max_lag=2, entropy_sample=512, ensemble_window=4, block_elems=256)
    cluster = ClusterSettings(scheduler_address=dask_cluster.scheduler_address)
    cache = tmp_path / "cache"
    stores = [
        _node(
            analyze(run, tmp_path / f"{i}.zarr", settings, cluster, base_model=b, cache_dir=cache)
        )
        for i, b in enumerate((base_file, other))
    ]
    ratio = (stores[1].weight_rms / stores[0].weight_rms).values
    assert ((ratio > 1.5) & (ratio < 2.5)).all(), ratio  # W0 doubled dominates the rms
