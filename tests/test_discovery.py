"""Discovery of real checkpoint series in every supported layout."""

import json
import os
import time

import checkpoint_factory as cf
import pytest
import torch

from pipeline.core.manifest import Manifest
from pipeline.ingest.discovery import discover, natural_key, step_from_name
from pipeline.ingest.safetensors_io import read_rows


@pytest.mark.parametrize(
    "name,step",
    [
        ("step_000100", 100),
        ("ckpt-100", 100),
        ("model_100", 100),
        ("checkpoint_100", 100),
        ("100", 100),
        ("epoch3-step100", 100),
        ("global_step7_epoch2", 7),
        ("run2_model", 2),
        ("STEP-0005", 5),
    ],
)
def test_step_from_name(name, step):
    assert step_from_name(f"{name}.safetensors") == step


def test_step_from_name_without_number():
    assert step_from_name("model.safetensors") is None


def test_natural_key_orders_numbers_by_value():
    names = ["layers.10.weight", "layers.2.weight", "layers.0.bias", "emb", "layers.0.weight"]
    assert sorted(names, key=natural_key) == [
        "emb",
        "layers.0.bias",
        "layers.0.weight",
        "layers.2.weight",
        "layers.10.weight",
    ]


@pytest.mark.parametrize(
    "pattern",
    [
        "step_{step:06d}.safetensors",
        "ckpt-{step}.safetensors",
        "model_{step}.safetensors",
        "checkpoint_{step}.safetensors",
        "{step}.safetensors",
        "epoch3-step{step}.safetensors",
    ],
)
def test_flat_layout_steps_and_order(tmp_path, pattern):
    run = tmp_path / "myrun"
    paths = cf.write_flat(run, [100, 5, 20], pattern=pattern)
    m = discover(run)
    assert [r.name for r in m.runs] == ["myrun"]
    r = m.runs[0]
    assert r.steps == [5, 20, 100]
    assert r.path == str(run) and os.path.isabs(r.path)
    assert [t.name for t in r.tensors] == cf.NATURAL_ORDER
    by_step = dict(zip([100, 5, 20], paths))
    for c in r.checkpoints:
        assert set(c.files.values()) == {by_step[c.step]}


def test_metadata_step_wins_over_name(tmp_path):
    cf.write_file(tmp_path / "r" / "step_5.safetensors", cf.model_tensors(0), {"step": "100"})
    cf.write_file(tmp_path / "r" / "step_6.safetensors", cf.model_tensors(1), {"step": "200"})
    assert discover(tmp_path / "r").runs[0].steps == [100, 200]


def test_metadata_step_lets_unnumbered_names_work(tmp_path):
    cf.write_flat(tmp_path / "r", [3, 1], pattern="weights_{step}.safetensors", metadata_step=True)
    assert discover(tmp_path / "r").runs[0].steps == [1, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_trainer_layout_single_file(tmp_path, dtype):
    dirs = cf.write_trainer(tmp_path / "run", [0, 500, 1000, 10], dtype)
    r = discover(tmp_path / "run").runs[0]
    assert r.steps == [0, 10, 500, 1000]
    assert all(
        t.dtype == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
        for t in r.tensors
    )
    c = r.checkpoints[-1]
    assert c.files["layers.2.weight"] == os.path.join(dirs[2], "model.safetensors")
    got = read_rows(c.files["layers.2.weight"], "layers.2.weight", 0, 8)
    assert torch.equal(got, cf.model_tensors(1000, dtype)["layers.2.weight"].float())


def test_trainer_layout_sharded_maps_each_tensor_to_its_shard(tmp_path):
    cf.write_trainer(tmp_path / "run", [1, 2], sharded=True)
    r = discover(tmp_path / "run").runs[0]
    assert r.steps == [1, 2]
    for c in r.checkpoints:
        shards = set(c.files.values())
        assert len(shards) == 2
        for name, path in c.files.items():
            want = cf.model_tensors(c.step)[name]
            assert torch.equal(read_rows(path, name, 0, want.shape[0]), want)


def test_sweep_of_runs(tmp_path):
    cf.write_sweep(tmp_path, ["lr_10", "lr_2", "lr_1"], [0, 1, 2], layout="flat")
    cf.write_sweep(tmp_path, ["hf"], [4, 8], layout="trainer")
    (tmp_path / "notes").mkdir()  # a folder without checkpoints is not a run
    m = discover(tmp_path)
    assert [r.name for r in m.runs] == ["hf", "lr_1", "lr_2", "lr_10"]
    assert [r.steps for r in m.runs] == [[4, 8], [0, 1, 2], [0, 1, 2], [0, 1, 2]]
    assert m.root == str(tmp_path) and m.skipped == []


def test_int_buffers_are_not_layers(tmp_path):
    cf.write_flat(tmp_path / "r", [0, 1], buffers=True)
    r = discover(tmp_path / "r").runs[0]
    assert "position_ids" not in [t.name for t in r.tensors]
    assert "position_ids" not in r.checkpoints[0].files


def test_header_hash_digests_headers_and_sizes(tmp_path):
    cf.write_flat(tmp_path / "a", [0, 1])
    cf.write_flat(tmp_path / "b", [0, 1], dtype=torch.float16)
    ha = [c.header_hash for c in discover(tmp_path / "a").runs[0].checkpoints]
    hb = [c.header_hash for c in discover(tmp_path / "b").runs[0].checkpoints]
    assert len(ha[0]) == 64 and ha[0] != hb[0]
    assert ha == [c.header_hash for c in discover(tmp_path / "a").runs[0].checkpoints]


def test_trainer_log_and_activations_attached(tmp_path):
    cf.write_trainer(tmp_path / "run", [10, 20], hidden_act="silu")
    r = discover(tmp_path / "run").runs[0]
    assert r.log.step == [10, 20] and r.log.source.endswith("checkpoint-20/trainer_state.json")
    # the config was read; the tiny model's generic names match no architecture rule, so no
    # tensor is claimed to feed silu (ingest/architecture.py; tests/test_architecture_efficiency)
    assert r.activations == {}


def test_loose_file_next_to_trainer_folders_is_listed_not_used(tmp_path):
    cf.write_trainer(tmp_path / "run", [1, 2])
    loose = cf.write_file(tmp_path / "run" / "model.safetensors", cf.model_tensors(9))
    m = discover(tmp_path / "run")
    assert m.runs[0].steps == [1, 2]
    assert [p for p, _ in m.skipped] == [loose]


def test_manifest_json_roundtrip(tmp_path):
    cf.write_trainer(tmp_path / "run", [1, 2], sharded=True)
    m = discover(tmp_path / "run")
    back = Manifest.from_json(m.to_json())
    assert back.runs[0].checkpoints == m.runs[0].checkpoints
    assert back.runs[0].tensors == m.runs[0].tensors
    assert json.loads(back.to_json()) == json.loads(m.to_json())


def test_discovery_reads_headers_only_and_is_fast(tmp_path):
    cf.write_trainer(tmp_path / "run", range(0, 500, 10), log=False, hidden_act=None)
    discover(tmp_path / "run")  # warm the file system cache
    t0 = time.perf_counter()
    m = discover(tmp_path / "run")
    elapsed = time.perf_counter() - t0
    assert len(m.runs[0].checkpoints) == 50
    assert elapsed < 0.5, f"discovery of 50 checkpoints took {elapsed:.3f} s"


def test_header_hash_changes_when_a_checkpoint_is_resaved_in_place(tmp_path):
    """Same shapes, new values: the header is byte-identical, the mtime is not."""
    cf.write_flat(tmp_path / "a", [0, 1])
    before = [c.header_hash for c in discover(tmp_path / "a").runs[0].checkpoints]
    path = tmp_path / "a" / "step_000001.safetensors"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    after = [c.header_hash for c in discover(tmp_path / "a").runs[0].checkpoints]
    assert after[0] == before[0] and after[1] != before[1]
