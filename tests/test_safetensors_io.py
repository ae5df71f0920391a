"""Header parsing and row reads on real safetensors files written by safetensors.torch."""

import os

import checkpoint_factory as cf
import pytest
import torch

from pipeline.core.errors import InputError
from pipeline.core.manifest import TensorInfo
from pipeline.ingest.safetensors_io import (
    DTYPES,
    FLOAT_DTYPES,
    is_float_dtype,
    load_header,
    read_header,
    read_metadata,
    read_rows,
    tensor_infos,
    torch_dtype,
)

WEIGHT_CODES = ("F32", "F16", "BF16")  # the storage dtypes of real training runs


@pytest.fixture
def model_file(tmp_path):
    def make(dtype=torch.float32, step=3):
        tensors = cf.model_tensors(step, dtype, buffers=True)
        return cf.write_file(
            tmp_path / f"m_{dtype}.safetensors", tensors, {"step": str(step)}
        ), tensors

    return make


@pytest.mark.parametrize("code", list(DTYPES))
def test_dtype_table_agrees_with_safetensors_and_torch(tmp_path, code):
    """Each code is what the safetensors library writes for its torch dtype, with torch's
    element size and floating-point flag."""
    dtype = torch_dtype(code)
    path = cf.write_file(tmp_path / "d.safetensors", {"x": torch.zeros(3).to(dtype)})
    assert read_header(path)["x"][0] == code
    assert dtype.itemsize == DTYPES[code].itemsize
    assert dtype.is_floating_point == DTYPES[code].is_float == is_float_dtype(code)


@pytest.mark.parametrize("code", WEIGHT_CODES)
def test_read_header_matches_written_tensors(model_file, code):
    path, tensors = model_file(torch_dtype(code))
    hdr = read_header(path)
    assert set(hdr) == set(tensors)
    for name, t in tensors.items():
        dtype, shape, (begin, end) = hdr[name]
        assert shape == tuple(t.shape)
        assert end - begin == t.numel() * t.element_size()
        assert dtype == (code if t.is_floating_point() else "I64")
    assert "__metadata__" not in hdr


def test_metadata_and_infos(model_file):
    path, tensors = model_file(torch.float16, step=42)
    assert read_metadata(path) == {"step": "42"}
    infos = {t.name: t for t in tensor_infos(path)}
    assert infos["layers.0.weight"] == TensorInfo("layers.0.weight", (8, 4), "F16")
    assert infos["position_ids"].dtype == "I64" and not is_float_dtype("I64")
    assert all(is_float_dtype(infos[n].dtype) for n in cf.SHAPES)


def test_metadata_absent_is_empty(tmp_path):
    path = cf.write_file(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    assert read_metadata(path) == {}


@pytest.mark.parametrize("code", WEIGHT_CODES)
@pytest.mark.parametrize("start,stop", [(0, 8), (2, 5), (7, 8), (3, 3)])
def test_read_rows_equals_upcast_values(model_file, code, start, stop):
    path, tensors = model_file(torch_dtype(code))
    for name in ("layers.0.weight", "layers.0.bias"):
        got = read_rows(path, name, start, stop)
        want = tensors[name][start:stop].to(torch.float32)
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, want)
        reused = torch.full_like(want, float("nan"))  # the streaming path: read into a held buffer
        assert torch.equal(read_rows(path, name, start, stop, out=reused), want)
        assert torch.equal(reused, want)


def test_read_rows_into_buffer_reports_a_file_truncated_after_validation(tmp_path):
    path = cf.write_file(tmp_path / "t.safetensors", {"w": torch.arange(64.0).reshape(8, 8)})
    read_rows(path, "w", 0, 8)  # header validated and cached
    with open(
        path, "r+b"
    ) as f:  # another process truncates it in place, same size in the cache key
        f.truncate(os.path.getsize(path) - 16)
    with pytest.raises(InputError, match="t.safetensors"):
        read_rows(path, "w", 0, 8, out=torch.empty(8, 8))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn, torch.float8_e5m2])
def test_read_rows_other_float_dtypes(tmp_path, dtype):
    t = (torch.randn(6, 3) * 4).to(dtype)
    path = cf.write_file(tmp_path / "x.safetensors", {"w": t})
    assert read_header(path)["w"][0] in FLOAT_DTYPES
    got = read_rows(path, "w", 1, 4)
    assert got.dtype == torch.float32
    assert torch.equal(got, t[1:4].to(torch.float32))


def test_read_rows_scalar_and_int_buffer(tmp_path):
    path = cf.write_file(
        tmp_path / "s.safetensors", {"s": torch.tensor(2.5), "ids": torch.arange(5)}
    )
    assert read_rows(path, "s", 0, 0).item() == 2.5
    assert torch.equal(read_rows(path, "ids", 1, 3), torch.tensor([1.0, 2.0]))


def test_read_rows_rejects_bad_requests(model_file):
    path, _ = model_file()
    with pytest.raises(InputError, match="no such tensor") as e:
        read_rows(path, "nope", 0, 1)
    assert path in str(e.value) and "'nope'" in str(e.value)
    with pytest.raises(InputError, match="outside the first dimension"):
        read_rows(path, "layers.0.weight", 0, 9)
    with pytest.raises(InputError, match="outside the first dimension"):
        read_rows(path, "layers.0.weight", 5, 4)


def test_read_rows_sees_rewritten_file(tmp_path):
    """The header cache is keyed on file identity, so a rewritten checkpoint is re-validated."""
    p = tmp_path / "w.safetensors"
    cf.write_file(p, {"w": torch.zeros(4, 2)})
    assert read_rows(str(p), "w", 0, 4).sum() == 0
    os.remove(p)
    cf.write_file(p, {"w": torch.ones(6, 2)})
    assert torch.equal(read_rows(str(p), "w", 0, 6), torch.ones(6, 2))


def test_header_raw_bytes_are_the_prefix_of_the_file(model_file):
    path, _ = model_file()
    hd = load_header(path)
    with open(path, "rb") as f:
        assert f.read(len(hd.raw)) == hd.raw
    assert hd.file_size == os.path.getsize(path)


def test_read_rows_streams_large_tensor_in_blocks(tmp_path):
    """Block reads reassemble the tensor exactly (memory-mapped slices, fp32 out)."""
    t = torch.randn(1024, 256).to(torch.bfloat16)
    path = cf.write_file(tmp_path / "big.safetensors", {"w": t})
    blocks = [read_rows(path, "w", i, min(i + 100, 1024)) for i in range(0, 1024, 100)]
    assert torch.equal(torch.cat(blocks), t.float())
