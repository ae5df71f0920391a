"""Each checkpoint-folder layout of ``ingest.layouts``, on files written in that exact layout,
and the one-line refusal (with the conversion command) of weights that are not safetensors."""

from __future__ import annotations

import json

import checkpoint_factory as cf
import pytest
import torch

from pipeline.core.errors import InputError
from pipeline.ingest import layouts
from pipeline.ingest.discovery import discover, scan
from pipeline.ingest.training_log import checkpoint_dirs, read_training_log


def _folders(root, names, meta_steps=None, sharded=False):
    """One checkpoint per folder name (``root/<name>/model.safetensors``), step i's weights."""
    for i, name in enumerate(names):
        d = root / name
        tensors = cf.model_tensors(i)
        if sharded:
            cf.write_sharded(d, tensors)
        else:
            meta = {"step": str(meta_steps[i])} if meta_steps else None
            cf.write_file(d / "model.safetensors", tensors, meta)
    return root


@pytest.mark.parametrize(
    "names, steps",
    [
        (["step_100", "step_20", "step_3"], [3, 20, 100]),  # step_N
        (["step100", "step20"], [20, 100]),  # stepN
        (["step10-unsharded", "step20-unsharded"], [10, 20]),  # OLMo
        (["step10-tokens42B", "step20-tokens84B"], [10, 20]),  # OLMo Hub revision names
        (["global_step5", "global_step15"], [5, 15]),  # DeepSpeed
        (["checkpoint-4-epoch-1", "checkpoint-8-epoch-2"], [4, 8]),  # checkpoint-N-epoch-M
        (["checkpoint-7", "checkpoint-70"], [7, 70]),  # Hugging Face Trainer
    ],
)
def test_folder_layouts_take_the_step_from_the_name(tmp_path, names, steps):
    run = discover(_folders(tmp_path / "run", names)).runs[0]
    assert run.steps == steps
    first = run.checkpoints[0].files["layers.0.weight"]
    assert first.endswith("/model.safetensors") and any(n in first for n in names)


def test_folder_name_outranks_trainer_state_and_metadata(tmp_path):
    root = _folders(tmp_path / "run", ["step_10", "step_20"], meta_steps=[111, 222])
    state = {**cf.trainer_state([10]), "global_step": 999}
    (root / "step_10" / "trainer_state.json").write_text(json.dumps(state))
    assert discover(root).runs[0].steps == [10, 20]


def test_sharded_checkpoint_in_step_folders(tmp_path):
    run = discover(_folders(tmp_path / "run", ["step_1", "step_2"], sharded=True)).runs[0]
    assert run.steps == [1, 2]
    assert len(set(run.checkpoints[0].files.values())) == 2  # two shards


def _accelerate(root, n, state_steps=None, meta_steps=None):
    """Accelerate ``save_state`` with automatic naming: project/checkpoints/checkpoint_<i>/."""
    for i in range(n):
        d = root / "checkpoints" / f"checkpoint_{i}"
        meta = {"step": str(meta_steps[i])} if meta_steps else None
        cf.write_file(d / "model.safetensors", cf.model_tensors(i), meta)
        (d / "optimizer.bin").write_bytes(b"not a weights file")
        (d / "random_states_0.pkl").write_bytes(b"not read")
        if state_steps:
            state = {**cf.trainer_state(state_steps[: i + 1]), "global_step": state_steps[i]}
            (d / "trainer_state.json").write_text(json.dumps(state))
    return root


def test_accelerate_step_from_trainer_state(tmp_path):
    run = discover(_accelerate(tmp_path / "proj", 3, state_steps=[50, 100, 150])).runs[0]
    assert run.name == "proj" and run.steps == [50, 100, 150]


def test_accelerate_step_from_metadata(tmp_path):
    run = discover(_accelerate(tmp_path / "proj", 2, meta_steps=[500, 1000])).runs[0]
    assert run.steps == [500, 1000]


def test_accelerate_without_a_recorded_step_uses_the_save_index_and_says_so(tmp_path):
    s = scan(_accelerate(tmp_path / "proj", 3))
    assert s.runs[0].steps == [0, 1, 2]
    notes = [what for f, what in s.files.items() if "checkpoint_1" in f]
    assert notes and "Accelerate save index 1" in notes[0]


def test_training_log_is_found_in_the_latest_folder_of_any_layout(tmp_path):
    root = _folders(tmp_path / "run", ["step_1", "step_2"])
    (root / "step_2" / "trainer_state.json").write_text(json.dumps(cf.trainer_state([1, 2])))
    assert [n for n, _ in checkpoint_dirs(str(root))] == [1, 2]
    log = read_training_log(root)
    assert log.step == [1, 2] and log.source.endswith("step_2/trainer_state.json")


def _refusal(root, folder) -> str:
    with pytest.raises(InputError) as e:
        discover(root)
    assert e.value.path == str(folder)
    return e.value.reason


def test_deepspeed_zero_shards_are_named_with_their_converter(tmp_path):
    d = tmp_path / "run" / "global_step10"
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x04pickle, never opened")
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\x80\x04")
    reason = _refusal(tmp_path / "run", d)
    assert "DeepSpeed ZeRO shards" in reason and "zero_to_fp32.py" in reason
    assert "--safe_serialization" in reason and "\n" not in reason


def test_fsdp_distcp_is_named_with_its_converter(tmp_path):
    d = tmp_path / "run" / "checkpoint-4"
    (d / "pytorch_model_fsdp_0").mkdir(parents=True)
    (d / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"x")
    (d / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"x")
    reason = _refusal(tmp_path / "run", d)
    assert ".distcp" in reason and "accelerate merge-weights" in reason


def test_olmo_unsharded_pickle_is_named_not_opened(tmp_path):
    d = tmp_path / "run" / "step1000-unsharded"
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(b"\x80\x04 a pickle that must never be loaded")
    (d / "optim.pt").write_bytes(b"\x80\x04")
    reason = _refusal(tmp_path / "run", d)
    assert "model.pt" in reason and "weights_only=True" in reason and "optim.pt" not in reason


def test_flat_folder_of_bin_files_is_named_at_the_root(tmp_path):
    for s in (1, 2):
        torch.save({"w": torch.zeros(2)}, tmp_path / f"pytorch_model_{s}.bin")
    reason = _refusal(tmp_path, tmp_path)
    assert "pickled PyTorch file (.bin)" in reason and "(+1 more)" in reason


def test_side_files_alone_are_not_a_foreign_format(tmp_path):
    assert layouts.foreign_format("d", ["optimizer.pt", "scheduler.pt", "rng_state.pth"]) is None


def test_one_place_for_folder_patterns():
    assert layouts.match_folder("checkpoint-12") == ("trainer", 12)
    assert layouts.match_folder("global_step3") == ("deepspeed", 3)
    assert layouts.match_folder("checkpoint-best") is None
    assert layouts.malformed_folder("checkpoint-best") == "best"
    assert layouts.match_folder("stepwise") is None
