"""Safetensors files read without trusting them: a validated header, then row blocks as fp32.

A safetensors file is ``<u64 little-endian N><N bytes of JSON header><data buffer>``. The header
maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to
the start of the data buffer) plus an optional ``"__metadata__"`` of string -> string.

``read_header`` checks everything a corrupt or hostile file can get wrong before anything
else touches it: the length prefix is bounded by the file size and by ``MAX_HEADER_BYTES``
(nothing is allocated from an unchecked number), the JSON is parsed with recursion and
number-size errors caught, each entry's byte span must equal ``numel * itemsize``, and the
spans must tile the data buffer exactly (no overlap, no gap, nothing past the end, no
trailing bytes), which is the same rule the safetensors library itself enforces. Every
problem becomes ``InputError(path, reason, tensor)``.

``read_rows`` then reads a row block through ``safe_open(...).get_slice`` (memory-mapped, only
the requested bytes) and upcasts once to contiguous float32. A path that is a URL (s3://,
https://, hf://, ...) is read the same way through ``remote``: the header with one or two
byte-range requests, a row block with one, each cached on local disk.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import struct
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.core.errors import InputError
from pipeline.core.manifest import TensorInfo
from pipeline.ingest import remote

if (
    TYPE_CHECKING
):  # torch is imported by read_rows only: header validation (check, discovery) stays light
    import torch

MAX_HEADER_BYTES = 100_000_000  # same cap as the safetensors library


@dataclass(frozen=True)
class DType:
    """What the pipeline knows about one safetensors dtype code."""

    itemsize: int  # bytes per element
    is_float: bool  # floating point: a weight (read_rows upcasts it to float32)
    torch_name: str  # the torch dtype, ``getattr(torch, torch_name)`` (see ``torch_dtype``)


#: The one dtype table: safetensors dtype code -> DType, for every code this package reads.
DTYPES: dict[str, DType] = {
    "F64": DType(8, True, "float64"),
    "F32": DType(4, True, "float32"),
    "F16": DType(2, True, "float16"),
    "BF16": DType(2, True, "bfloat16"),
    "F8_E4M3": DType(1, True, "float8_e4m3fn"),
    "F8_E5M2": DType(1, True, "float8_e5m2"),
    "I64": DType(8, False, "int64"),
    "I32": DType(4, False, "int32"),
    "I16": DType(2, False, "int16"),
    "I8": DType(1, False, "int8"),
    "U64": DType(8, False, "uint64"),
    "U32": DType(4, False, "uint32"),
    "U16": DType(2, False, "uint16"),
    "U8": DType(1, False, "uint8"),
    "BOOL": DType(1, False, "bool"),
}
#: Floating-point dtype codes: the ones that are weights.
FLOAT_DTYPES = frozenset(code for code, d in DTYPES.items() if d.is_float)
#: Codes ``read_rows`` reads with one ``readinto`` into a float32 buffer (half types staged).
_DIRECT = ("F32", "BF16", "F16")


def is_float_dtype(dtype: str) -> bool:
    """True for the floating-point dtype codes (weights); False for integer/bool buffers."""
    return dtype in FLOAT_DTYPES


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``KeyError`` for an unknown code)."""
    import torch

    return getattr(torch, DTYPES[dtype].torch_name)


@dataclass(frozen=True)
class Header:
    """A validated header: ``tensors`` {name: (dtype, shape, (begin, end))} in file order,
    ``metadata`` (``__metadata__``), the ``raw`` bytes (length prefix + JSON) and file size;
    ``version``: a URL's ETag/Last-Modified (its ``mtime_ns`` is 0)."""

    path: str
    tensors: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]
    metadata: dict[str, str]
    raw: bytes
    file_size: int
    mtime_ns: int
    version: str = ""

    def digest_into(self, h: hashlib._Hash) -> None:
        """Feed raw header bytes, the file size and its modification time (a URL: its version)
        into a running hash: a checkpoint re-saved in place (same shapes, new values) changes
        the digest."""
        h.update(struct.pack("<QQ", self.file_size, self.mtime_ns))
        if self.version:
            h.update(self.version.encode())
        h.update(self.raw)


_FIRST_READ = 1 << 15  # bytes of a remote file's first request: most headers fit


def _bounded_length(path: str, prefix: bytes, size: int) -> int:
    """The header length of the 8-byte ``prefix``, checked against the file ``size``."""
    if len(prefix) < 8:
        raise InputError(path, f"file is {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise InputError(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > size:
        raise InputError(path, f"header length {n} runs past the end of the file ({size} bytes)")
    return n


def _remote_header(path: str) -> tuple[bytes, int, str]:
    """Length-prefix + header bytes, size and version of a URL: one ranged request (two when
    the header is longer than ``_FIRST_READ``); the version is recorded for the readers."""
    size, version = remote.record_stat(path)
    first = remote.read_range(path, 0, min(size, _FIRST_READ))
    n = _bounded_length(path, first, size)
    if 8 + n > len(first):
        first += remote.read_range(path, len(first), 8 + n)
    return first[: 8 + n], size, version


def _raw_header(path: str) -> tuple[bytes, os.stat_result]:
    """Length-prefix + header bytes and the file's stat, bounded before any allocation."""
    if os.path.isdir(path):
        raise InputError(path, "is a directory, not a safetensors file")
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            prefix = f.read(8)
            n = _bounded_length(path, prefix, size)
            body = f.read(n)
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    if len(body) != n:
        raise InputError(path, "file shrank while reading the header")
    return prefix + body, st


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key '{dup}'")
    return dict(pairs)


def _parse_json(path: str, body: bytes) -> dict:
    try:
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise InputError(path, "header is not UTF-8 text") from None
    except RecursionError:
        raise InputError(path, "header JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, duplicate keys, over-long integers
        raise InputError(path, f"header is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise InputError(path, "header is not a JSON object")
    return obj


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: str, name: str, e) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """Validate one tensor entry: known dtype, integer shape, span = numel * itemsize."""
    if not isinstance(e, dict):
        raise InputError(path, "header entry is not an object", name)
    dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InputError(path, f"unknown dtype {str(dtype)[:40]!r}", name)
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise InputError(path, "shape is not a list of non-negative integers", name)
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_index(o) for o in offs):
        raise InputError(path, "data_offsets is not a pair of non-negative integers", name)
    begin, end = offs
    if end < begin:
        raise InputError(path, f"data_offsets end {end} before begin {begin}", name)
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise InputError(
            path,
            f"shape {tuple(shape)} x {dtype} needs {nbytes} bytes "
            f"but data_offsets span {end - begin}",
            name,
        )
    return dtype, tuple(shape), (begin, end)


def _metadata(path: str, meta) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(path, "__metadata__ is not an object of strings")
    return meta


def _check_tiling(path: str, tensors: dict, data_len: int) -> None:
    """Spans must cover [0, data_len) exactly once: no overlap, gap, overrun or trailing bytes."""
    pos, prev = 0, None
    for name, (_, _, (begin, end)) in sorted(tensors.items(), key=lambda kv: kv[1][2]):
        if end > data_len:
            raise InputError(
                path,
                f"data_offsets [{begin}, {end}] run past the end of the file "
                f"(data buffer is {data_len} bytes)",
                name,
            )
        if begin < pos:
            raise InputError(path, f"data_offsets [{begin}, {end}] overlap tensor '{prev}'", name)
        if begin > pos:
            raise InputError(
                path, f"gap of {begin - pos} bytes before data_offsets [{begin}, {end}]", name
            )
        pos, prev = end, name
    if pos != data_len:
        raise InputError(
            path, f"{data_len - pos} bytes after the last tensor are not covered by the header"
        )


def load_header(path) -> Header:
    """Read and fully validate the header of ``path``; raises ``InputError`` on any problem."""
    path = os.fspath(path)
    if remote.is_url(path):
        raw, size, version = _remote_header(path)
        mtime_ns = 0
    else:
        raw, st = _raw_header(path)
        size, mtime_ns, version = st.st_size, st.st_mtime_ns, ""
    obj = _parse_json(path, raw[8:])
    meta = _metadata(path, obj.pop("__metadata__", None))
    tensors = {name: _entry(path, name, e) for name, e in obj.items()}
    _check_tiling(path, tensors, size - len(raw))
    return Header(path, tensors, meta, raw, size, mtime_ns, version)


def read_header(path) -> dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]:
    """Validated tensor entries of a safetensors file: {name: (dtype, shape, (begin, end))}.

    Offsets are relative to the data buffer, as in the file. ``__metadata__`` is not included
    (see ``read_metadata``). Raises ``InputError`` naming the file (and tensor) on any problem.
    """
    return dict(load_header(path).tensors)


def read_metadata(path) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file ({} when absent); validates it."""
    return dict(load_header(path).metadata)


def tensor_infos(path) -> list[TensorInfo]:
    """Every tensor of the file as ``TensorInfo`` (float and non-float), in header order."""
    return [
        TensorInfo(n, shape, dtype) for n, (dtype, shape, _) in load_header(path).tensors.items()
    ]


@functools.lru_cache(maxsize=512)
def _cached_header(path: str, size: int, mtime_ns: int, ctime_ns: int, ino: int) -> Header:
    return load_header(path)


@functools.lru_cache(maxsize=512)
def _cached_remote_header(path: str, size: int, version: str) -> Header:
    return load_header(path)


def _header_for_read(path: str) -> Header:
    if remote.is_url(path):
        return _cached_remote_header(path, *remote.stat(path, fresh=False))
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    return _cached_header(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def read_rows(
    path: str, name: str, start: int, stop: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``[start, stop)`` of tensor ``name`` (first dimension; elements of a 1-D tensor; the
    scalar itself for 0-D, where start/stop are ignored) as a contiguous ``torch.float32`` tensor.

    Memory-mapped: only the requested bytes are read, then upcast once (F16/BF16/F8/F64 ->
    F32; F32 is returned as read). With ``out`` (a float32 tensor of the block's size, reused
    by the streaming measurement) F32/BF16/F16 rows are read straight into it: no allocation
    per checkpoint. The header is validated (cached per path, size, times and inode).
    Raises ``InputError`` for a bad file, an unknown tensor or an out-of-range row block.
    """
    path = os.fspath(path)
    header = _header_for_read(path)
    if name not in header.tensors:
        raise InputError(path, "no such tensor in the file", name)
    dtype, shape, (begin, _) = header.tensors[name]
    if shape and not (0 <= start <= stop <= shape[0]):
        raise InputError(
            path, f"rows [{start}, {stop}) outside the first dimension {shape[0]}", name
        )
    row_elems = math.prod(shape[1:]) if shape else 1
    if remote.is_url(path):
        return _read_remote(header, name, start, stop, out)
    if out is not None and shape and dtype in _DIRECT and out.numel() == (stop - start) * row_elems:
        offset = len(header.raw) + begin + start * row_elems * DTYPES[dtype].itemsize
        return _read_into(path, name, offset, dtype, out)
    import torch

    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            t = f.get_slice(name)[start:stop] if shape else f.get_tensor(name)
    except InputError:
        raise
    except Exception as e:  # SafetensorError and anything torch raises on a damaged mapping
        raise InputError(
            path, f"cannot read tensor data ({type(e).__name__}: {str(e)[:120]})", name
        ) from None
    return t.to(torch.float32).contiguous()


def read_block(
    path: str, tensor: TensorInfo, start: int, stop: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``tensor`` in checkpoint file ``path`` as float32: stored
    tensors through ``read_rows``, virtual ones (``tensor.source``: a LoRA update) computed by
    ``lora.lora_rows`` from the file's adapter tensors. The one read the measurement calls."""
    if tensor.source is None:
        return read_rows(path, tensor.name, start, stop, out=out)
    from pipeline.ingest.lora import lora_rows  # lora reads through read_rows: no import cycle

    return lora_rows(path, tensor, start, stop, out=out)


def _read_into(path: str, name: str, offset: int, dtype: str, out: torch.Tensor) -> torch.Tensor:
    """Read ``out.numel()`` values of ``dtype`` at byte ``offset`` into the float32 ``out``."""
    import torch

    flat = out.reshape(-1)
    staging = flat if dtype == "F32" else torch.empty(flat.numel(), dtype=torch.int16)
    raw = memoryview(staging.numpy()).cast("B")
    try:  # os-level open and positioned reads: ~3x less overhead per call than open()/seek
        fd = os.open(path, os.O_RDONLY)
        try:
            got = 0
            while got < len(raw) and (k := os.preadv(fd, [raw[got:]], offset + got)):
                got += k
        finally:
            os.close(fd)
    except OSError as e:
        raise InputError(path, f"cannot read tensor data ({e.strerror or e})", name) from None
    if got != len(raw):
        raise InputError(
            path, "file ended inside the tensor's data (truncated while reading?)", name
        )
    if dtype != "F32":
        flat.copy_(staging.view(torch_dtype(dtype)))
    return out


def _read_remote(
    header: Header, name: str, start: int, stop: int, out: torch.Tensor | None
) -> torch.Tensor:
    """Rows ``[start, stop)`` of a URL's tensor: one byte-range read (``remote.read_range``,
    disk-cached), upcast to float32 (into ``out`` when it has the block's size)."""
    import torch

    dtype, shape, (begin, _) = header.tensors[name]
    rows = stop - start if shape else 1
    row_elems = math.prod(shape[1:]) if shape else 1
    row_bytes = row_elems * DTYPES[dtype].itemsize
    offset = len(header.raw) + begin + (start * row_bytes if shape else 0)
    data = remote.read_range(header.path, offset, offset + rows * row_bytes)
    with warnings.catch_warnings():  # read-only buffer: only read (copied into float32) below
        warnings.simplefilter("ignore", UserWarning)
        values = torch.frombuffer(data, dtype=torch_dtype(dtype)) if data else None
    block_shape = (rows, *shape[1:]) if shape else ()
    if out is not None and out.numel() == rows * row_elems and shape:
        if values is not None:
            out.reshape(-1).copy_(values)
        return out
    if values is None:
        return torch.empty(block_shape, dtype=torch.float32)
    return values.to(torch.float32).reshape(block_shape).contiguous()
