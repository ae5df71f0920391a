"""Bad input: every rejected case names the file (and tensor) with a short reason; random
corruption of real files gives either a correct result or InputError, never anything else."""

import json
import os
import struct
import tempfile
import tracemalloc

import checkpoint_factory as cf
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from pipeline.core.errors import InputError
from pipeline.ingest.discovery import discover
from pipeline.ingest.safetensors_io import read_header, read_rows
from pipeline.ingest.validate import check, format_table

F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


def _raw(tmp_path, header, data=bytes(16), length=None):
    return cf.write_raw(tmp_path / "bad.safetensors", header, data, length)


# (builder, expected reason fragment, tensor named in the message or None)
HEADER_CASES = {
    "directory": (lambda p: str(p), "is a directory", None),
    "short file": (
        lambda p: _write(p / "bad.safetensors", b"\x01\x02\x03"),
        "shorter than the 8-byte",
        None,
    ),
    "length beyond file": (
        lambda p: _raw(p, {"a": F32x4}, length=10_000),
        "runs past the end of the file",
        None,
    ),
    "huge length": (
        lambda p: _raw(p, {"a": F32x4}, length=2**63 + 5),
        "exceeds the 100000000-byte limit",
        None,
    ),
    "bad json": (lambda p: _raw(p, b'{"a": {"dtype": "F32",'), "not valid JSON", None),
    "not utf-8": (lambda p: _raw(p, b'{"\xff\xfe": 1}'), "not UTF-8", None),
    "deep nesting": (lambda p: _raw(p, b"[" * 100_000 + b"]" * 100_000), "nested too deeply", None),
    "not an object": (lambda p: _raw(p, b"[1, 2]"), "not a JSON object", None),
    "duplicate key": (lambda p: _raw(p, b'{"a": 1, "a": 2}'), "duplicate key 'a'", None),
    "unknown dtype": (
        lambda p: _raw(p, {"a": {**F32x4, "dtype": "F13"}}),
        "unknown dtype 'F13'",
        "a",
    ),
    "negative shape": (
        lambda p: _raw(p, {"a": {**F32x4, "shape": [-4]}}),
        "shape is not a list",
        "a",
    ),
    "bad offsets": (
        lambda p: _raw(p, {"a": {**F32x4, "data_offsets": [0]}}),
        "data_offsets is not a pair",
        "a",
    ),
    "end before begin": (
        lambda p: _raw(p, {"a": {**F32x4, "shape": [0], "data_offsets": [16, 0]}}),
        "end 0 before begin 16",
        "a",
    ),
    "shape vs offsets": (
        lambda p: _raw(p, {"a": {**F32x4, "shape": [8]}}),
        "needs 32 bytes but data_offsets span 16",
        "a",
    ),
    "offsets past end": (
        lambda p: _raw(p, {"a": {**F32x4, "data_offsets": [16, 32]}}),
        "run past the end of the file",
        "a",
    ),
    "overlap": (
        lambda p: _raw(
            p, {"a": F32x4, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
        ),
        "overlap tensor 'a'",
        "b",
    ),
    "gap": (
        lambda p: _raw(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}),
        "gap of 8 bytes",
        "a",
    ),
    "trailing bytes": (
        lambda p: _raw(p, {"a": F32x4}, bytes(20)),
        "4 bytes after the last tensor",
        None,
    ),
    "metadata not strings": (
        lambda p: _raw(p, {"__metadata__": {"step": 5}, "a": F32x4}),
        "__metadata__ is not an object of strings",
        None,
    ),
}


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_problem_names_file_and_reason(tmp_path, case):
    build, why, tensor = HEADER_CASES[case]
    path = build(tmp_path)
    with pytest.raises(InputError) as e:
        read_header(path)
    msg = str(e.value)
    assert msg.startswith(os.path.abspath(path) + ": ") and why in msg, msg
    assert e.value.tensor == tensor
    if tensor:
        assert f"tensor '{tensor}'" in msg
    if case != "directory":
        with pytest.raises(InputError):
            read_rows(path, "a", 0, 1)


@pytest.mark.parametrize("case", [c for c in HEADER_CASES if c != "directory"])
def test_discovery_rejects_bad_header_file(tmp_path, case):
    cf.write_flat(tmp_path, [1, 2])
    bad = HEADER_CASES[case][0](tmp_path)  # bad.safetensors, no step -> header error comes first
    with pytest.raises(InputError) as e:
        discover(tmp_path)
    assert bad in str(e.value) and HEADER_CASES[case][1] in str(e.value)


def _expect(root, *fragments, skip_bad=False):
    with pytest.raises(InputError) as e:
        discover(root, skip_bad=skip_bad)
    for f in fragments:
        assert str(f) in str(e.value), str(e.value)
    return e.value


def test_missing_and_empty_folders(tmp_path):
    _expect(tmp_path / "nope", tmp_path / "nope", "no such folder")
    _expect(tmp_path, tmp_path, "no checkpoints found")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    _expect(tmp_path, "no checkpoints found", skip_bad=True)
    f = cf.write_file(tmp_path / "x" / "step_1.safetensors", cf.model_tensors(1))
    _expect(f, f, "is a file, not a folder")


def test_duplicate_steps_name_both_files(tmp_path):
    (a,) = cf.write_flat(tmp_path, [7], pattern="step_{step}.safetensors")
    (b,) = cf.write_flat(tmp_path, [7], pattern="ckpt-{step:04d}.safetensors")
    _expect(tmp_path, a, b, "duplicate step 7")


def test_unparseable_steps(tmp_path):
    f = cf.write_file(tmp_path / "a" / "model.safetensors", cf.model_tensors(0))
    _expect(tmp_path / "a", f, "no step number")
    g = cf.write_file(tmp_path / "b" / "step_1.safetensors", cf.model_tensors(0), {"step": "one"})
    _expect(tmp_path / "b", g, "__metadata__ step 'one' is not an integer")
    cf.write_trainer(tmp_path / "c", [1])
    (tmp_path / "c" / "checkpoint-final").mkdir()
    _expect(
        tmp_path / "c",
        tmp_path / "c" / "checkpoint-final",
        "'final' in the folder name is not an integer",
    )


def _series_with(tmp_path, change):
    """Three good flat checkpoints and a fourth whose tensors are changed by ``change``."""
    cf.write_flat(tmp_path, [1, 2, 3])
    tensors = change(cf.model_tensors(4))
    return cf.write_file(tmp_path / "step_000004.safetensors", tensors)


@pytest.mark.parametrize(
    "change,tensor,why",
    [
        (
            lambda t: {**t, "layers.2.weight": torch.zeros(8, 9)},
            "layers.2.weight",
            "shape changes from (8, 8)",
        ),
        (
            lambda t: {**t, "layers.2.weight": t["layers.2.weight"].half()},
            "layers.2.weight",
            "dtype changes from F32",
        ),
        (
            lambda t: {k: v for k, v in t.items() if k != "layers.0.bias"},
            "layers.0.bias",
            "missing here",
        ),
        (
            lambda t: {
                ("layers.3.weight" if k == "layers.2.weight" else k): v for k, v in t.items()
            },
            "layers.2.weight",
            "missing here but present in",
        ),
    ],
)
def test_cross_checkpoint_changes_name_checkpoint_and_tensor(tmp_path, change, tensor, why):
    bad = _series_with(tmp_path, change)
    err = _expect(tmp_path, bad, f"tensor '{tensor}'", why)
    assert err.path == bad
    m = discover(tmp_path, skip_bad=True)
    assert m.runs[0].steps == [1, 2, 3]
    assert [p for p, _ in m.skipped] == [bad] and tensor in m.skipped[0][1]


def test_added_tensor_is_reported(tmp_path):
    bad = _series_with(tmp_path, lambda t: {**t, "extra.weight": torch.ones(2, 2)})
    _expect(tmp_path, bad, "tensor 'extra.weight'", "not present in")


def _sharded(tmp_path, edit):
    cf.write_trainer(tmp_path, [1, 2], sharded=True)
    index = tmp_path / "checkpoint-2" / "model.safetensors.index.json"
    obj = json.loads(index.read_text())
    edit(obj["weight_map"])
    index.write_text(json.dumps(obj))
    return str(index)


def test_index_naming_missing_shard(tmp_path):
    index = _sharded(
        tmp_path, lambda wm: wm.update({"layers.0.bias": "model-00009-of-00009.safetensors"})
    )
    _expect(
        tmp_path, index, "'model-00009-of-00009.safetensors' named in weight_map does not exist"
    )


@pytest.mark.parametrize("where", ["absolute", "dotdot", "nested dotdot"])
def test_index_pointing_outside_is_refused_before_reading(tmp_path, where):
    outside = cf.write_file(
        tmp_path.parent / f"outside_{tmp_path.name}.safetensors", cf.model_tensors(2)
    )
    target = {
        "absolute": outside,
        "dotdot": f"../../{os.path.basename(outside)}",
        "nested dotdot": "sub/../../x.safetensors",
    }[where]
    index = _sharded(tmp_path, lambda wm: wm.update({k: target for k in wm}))
    _expect(tmp_path, index, "outside the checkpoint folder")


def test_index_tensor_not_in_its_shard(tmp_path):
    index = _sharded(
        tmp_path, lambda wm: wm.update({k: "model-00001-of-00002.safetensors" for k in wm})
    )
    _expect(tmp_path, index, "does not hold it")


def test_checkpoint_folder_without_safetensors(tmp_path):
    cf.write_trainer(tmp_path, [1])
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "pytorch_model.bin").write_bytes(b"x")
    _expect(tmp_path, tmp_path / "checkpoint-2", "no .safetensors file")


def test_skip_bad_drops_bad_checkpoints_and_counts_problems(tmp_path):
    cf.write_flat(tmp_path, [1, 2, 3])
    short = _write(tmp_path / "step_000004.safetensors", b"abc")
    trunc = tmp_path / "step_000005.safetensors"
    cf.write_file(trunc, cf.model_tensors(5))
    trunc.write_bytes(trunc.read_bytes()[:-7])
    err = _expect(tmp_path, short, "+1 more problems")
    assert err.path == short
    m = discover(tmp_path, skip_bad=True)
    assert m.runs[0].steps == [1, 2, 3]
    assert sorted(p for p, _ in m.skipped) == sorted([short, str(trunc)])


def test_skip_bad_with_nothing_usable_still_raises(tmp_path):
    _write(tmp_path / "step_1.safetensors", b"abcdefghij")
    _expect(tmp_path, "step_1.safetensors", skip_bad=True)


def test_bad_log_is_an_error_or_skipped(tmp_path):
    cf.write_flat(tmp_path, [1, 2])
    (tmp_path / "log.csv").write_text("step,loss\nx,1\n")
    _expect(tmp_path, tmp_path / "log.csv", "expected a number")
    m = discover(tmp_path, skip_bad=True)
    assert m.runs[0].log.source is None and m.skipped[0][0] == str(tmp_path / "log.csv")


def test_check_reports_every_file_and_folder_problems(tmp_path):
    run = tmp_path / "run"
    good = cf.write_flat(run, [1, 2, 3])
    short = _write(run / "step_000009.safetensors", b"abc")
    changed = cf.write_file(
        run / "step_000004.safetensors",
        {**cf.model_tensors(4), "layers.0.weight": torch.zeros(8, 5)},
    )
    cf.write_trainer(tmp_path / "hf", [5, 6], sharded=True)
    rows = check(tmp_path)
    verdict = {r["path"]: r for r in rows}
    assert all(verdict[g]["verdict"] == "ok" for g in good + [changed])
    assert verdict[short]["verdict"] == "error" and "shorter than" in verdict[short]["reason"]
    folder = [r for r in rows if r["path"] == str(run)]
    assert len(folder) == 1 and folder[0]["verdict"] == "error"
    assert (
        os.path.basename(changed) in folder[0]["reason"]
        and "layers.0.weight" in folder[0]["reason"]
    )
    hf = [r for r in rows if r["path"] == str(tmp_path / "hf")]
    assert hf[0]["verdict"] == "ok" and "2 checkpoints" in hf[0]["reason"]
    assert sum(r["path"].endswith(".index.json") for r in rows) == 2
    table = format_table(rows)
    assert f"{len(rows)} checked, 2 error(s)" in table and "step_000009.safetensors" in table


def test_check_never_raises_on_missing_folder(tmp_path):
    rows = check(tmp_path / "nope")
    assert rows == [
        {"path": str(tmp_path / "nope"), "verdict": "error", "reason": "no such folder"}
    ]


# ---------------------------------------------------------------- random corruption
VALID_TENSORS = {
    "a": torch.randn(3, 2),
    "b": torch.randn(5).half(),
    "c": torch.randn(2, 2).bfloat16(),
    "s": torch.tensor(1.5, dtype=torch.float64),
}
VALID = st_save(VALID_TENSORS, metadata={"step": "3"})
HLEN = 8 + struct.unpack("<Q", VALID[:8])[0]
SETTINGS = settings(
    max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield d


def _fresh(scratch, data: bytes) -> str:
    path = os.path.join(scratch, f"f{len(os.listdir(scratch))}.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    return path


def _read_everything(path: str, untouched: set[str] = frozenset()) -> None:
    """read_header/read_rows either succeed with consistent results or raise InputError."""
    tracemalloc.start()
    try:
        hdr = read_header(path)
    except InputError:
        hdr = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 4_000_000, f"read_header allocated {peak} bytes"
    for name in hdr or VALID_TENSORS:
        try:
            shape = hdr[name][1] if hdr else (1,)
            out = read_rows(path, name, 0, shape[0] if shape else 0)
        except InputError:
            assert hdr is None or name not in hdr
            continue
        assert out.dtype == torch.float32 and tuple(out.shape) == shape
        if name in untouched:
            assert torch.equal(out, VALID_TENSORS[name].float())


@SETTINGS
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6
    )
)
def test_random_byte_flips(scratch, flips):
    data = bytearray(VALID)
    for pos, val in flips:
        data[pos] = val
    _read_everything(_fresh(scratch, bytes(data)))


@SETTINGS
@given(
    flips=st.lists(
        st.tuples(st.integers(8, HLEN - 1), st.sampled_from(b'{}[]",:0123456789 FBx')),
        min_size=1,
        max_size=4,
    )
)
def test_random_header_edits(scratch, flips):
    data = bytearray(VALID)
    for pos, val in flips:
        data[pos] = val
    _read_everything(_fresh(scratch, bytes(data)))


@settings(SETTINGS, max_examples=80)
@given(
    flips=st.lists(
        st.tuples(st.integers(HLEN, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6
    )
)
def test_data_byte_flips_keep_other_tensors_exact(scratch, flips):
    data = bytearray(VALID)
    for pos, val in flips:
        data[pos] = val
    offsets = {n: e[2] for n, e in read_header(_fresh(scratch, VALID)).items()}
    touched = {n for n, (b, e) in offsets.items() for pos, _ in flips if b <= pos - HLEN < e}
    path = _fresh(scratch, bytes(data))
    assert set(read_header(path)) == set(VALID_TENSORS)  # data bytes never invalidate the header
    _read_everything(path, untouched=set(VALID_TENSORS) - touched)


@settings(SETTINGS, max_examples=80)
@given(cut=st.integers(0, len(VALID) - 1))
def test_truncation(scratch, cut):
    path = _fresh(scratch, VALID[:cut])
    with pytest.raises(InputError):
        read_header(path)
    _read_everything(path)


@settings(SETTINGS, max_examples=80)
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 2 * len(VALID))))
def test_forged_length_prefix(scratch, length):
    path = _fresh(scratch, struct.pack("<Q", length) + VALID[8:])
    _read_everything(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_a_clear_error_before_any_work(tmp_path):
    from pipeline.analyze import analyze
    from pipeline.settings import ClusterSettings, MeasureSettings

    cf.write_flat(tmp_path / "run", range(0, 50, 10))
    with pytest.raises(InputError, match="measure.device is 'cuda' but no CUDA device is visible"):
        analyze(
            tmp_path / "run",
            tmp_path / "out.zarr",
            MeasureSettings(device="cuda"),
            ClusterSettings(n_workers=1),
        )
    assert not (tmp_path / "out.zarr").exists()
