"""One file-system interface for local folders and URLs (s3://, gs://, https://, hf://).

Discovery lists folders and reads small files through ``entries``/``read_bytes``; the
measurement reads byte ranges through ``read_range``. Local paths go straight to ``os``; URLs
go through fsspec, and every byte read from a URL is kept in a local disk cache
(``cache_root()``: ``$THERMOSCOPE_CACHE``, else ``$XDG_CACHE_HOME/thermoscope/remote``, else
``~/.cache/thermoscope/remote``), so a rerun and a report regeneration read nothing twice.

Cache key: the URL, the file's version (size and ETag, or Last-Modified) and the byte span.
The index stage looks every file up afresh (``stat``: one listing or HEAD, no data) and records
the version in the cache; measurement tasks, which receive URLs, take the version from there,
so a rerun over a populated cache sends no request at all. A file changed on the server gets a
new version, hence new cache entries.

Series published as one Hub revision per step (Pythia ``step1000``; OLMo
``step1000-tokens4B``): ``hf://<owner>/<repo>`` without ``@revision`` lists its step branches
as folders ``step1000`` -> ``hf://<owner>/<repo>@step1000``, which discovery then reads like
any ``stepN/`` folder.

A failed request raises ``InputError`` naming the URL and the byte span; layers already
measured stay in the measurement cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

from pipeline.core.errors import InputError

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
#: Hub branches that are training steps: Pythia ``step1000``, OLMo ``step1000-tokens4B``.
HUB_STEP_REVISION = re.compile(r"^step(\d+)(?:-tokens\d+[A-Za-z]?)?$")


def is_url(path) -> bool:
    """True for ``scheme://...`` other than ``file://`` (those are read through fsspec)."""
    m = _URL.match(str(path))
    return bool(m) and m.group(1) != "file"


def local(path) -> str:
    """A local path (``file://`` prefix removed)."""
    path = os.fspath(path)
    return path[len("file://") :] if str(path).startswith("file://") else path


def normalize(path) -> str:
    """Absolute local path, or the URL without a trailing slash."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(local(path))


def join(base: str, *parts: str) -> str:
    """``os.path.join`` for local paths, '/'-join for URLs."""
    if not is_url(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def basename(path: str) -> str:
    """Last path component; for a Hub revision ``hf://owner/repo@step1000``: the revision."""
    if not is_url(path):
        return os.path.basename(path)
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return last.rsplit("@", 1)[-1] if path.startswith("hf://") else last


def dirname(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path)


@dataclass(frozen=True)
class Entry:
    """One item of a folder: ``path`` is what to open (for a Hub step revision, the revision)."""

    name: str
    path: str
    is_dir: bool


# ---------------------------------------------------------------- fsspec access (URLs only)


def _fs(url: str):
    """(fsspec filesystem, path inside it) for ``url``; instances are cached per process."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise InputError(url, f"no reader for this URL ({str(e)[:160]})") from None


def _failed(url: str, what: str, e: Exception) -> InputError:
    return InputError(url, f"{what} failed ({type(e).__name__}: {str(e)[:160]})")


_LISTINGS: dict[str, list[Entry]] = {}
_STATS: dict[str, tuple[int, str]] = {}


def forget() -> None:
    """Drop this process's listings and file versions (discovery starts each scan afresh)."""
    _LISTINGS.clear()
    _STATS.clear()


def _hub_repo(url: str) -> tuple[str, str] | None:
    """(repo_id, repo_type) when ``url`` is a Hub repository root without a revision."""
    m = re.match(r"^hf://((?:datasets/|spaces/)?)([^/@]+/[^/@]+)/?$", url)
    if not m:
        return None
    return m.group(2), (m.group(1).rstrip("/")[:-1] if m.group(1) else "model")


def hub_step_revisions(branches) -> list[tuple[int, str]]:
    """(step, branch) of the branches that are training steps, in step order."""
    found = [(int(m.group(1)), b) for b in branches if (m := HUB_STEP_REVISION.match(b))]
    return sorted(found)


def _hub_branches(fs, repo_id: str, repo_type: str) -> list[str]:
    """Branch names of a Hub repository (``fs._api``: the HfFileSystem's own client)."""
    api = getattr(fs, "_api", None)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    return [b.name for b in api.list_repo_refs(repo_id, repo_type=repo_type).branches]


def _url_entries(url: str) -> list[Entry]:
    fs, path = _fs(url)
    hub = _hub_repo(url) if url.startswith("hf://") else None
    try:
        if hub:
            steps = hub_step_revisions(_hub_branches(fs, *hub))
            if steps:
                return [Entry(b, f"{url.rstrip('/')}@{b}", True) for _, b in steps]
        # an HTTP folder is its index page, whose links are relative to the trailing slash
        listing = fs.ls(
            path + "/" if url.startswith(("http://", "https://")) else path, detail=True
        )
    except FileNotFoundError:
        return []
    except Exception as e:  # noqa: BLE001 - any transport error becomes one line
        raise _failed(url, "listing the folder", e) from None
    out = []
    for item in listing:
        child = fs.unstrip_protocol(item["name"].rstrip("/"))
        if child.rstrip("/") == url.rstrip("/"):
            continue
        is_dir = item.get("type") == "directory"
        out.append(Entry(basename(child), child, is_dir))
        if not is_dir and item.get("size") is not None and _version(item):
            _STATS[child] = (int(item["size"]), _version(item))
    return out


def _version(info: dict) -> str:
    keys = ("ETag", "etag", "blob_id", "md5Hash", "generation", "LastModified", "last_modified")
    for key in (*keys, "Last-Modified", "mtime"):
        if info.get(key):
            return f"{key}={str(info[key]).strip(chr(34))}"
    return ""


def entries(d: str) -> list[Entry]:
    """Items of folder ``d`` (hidden ones left out), natural order not applied."""
    if not is_url(d):
        d = local(d)
        try:
            names = [n for n in os.listdir(d) if not n.startswith(".")]
        except OSError:
            return []
        return [Entry(n, os.path.join(d, n), os.path.isdir(os.path.join(d, n))) for n in names]
    key = d.rstrip("/")
    if key not in _LISTINGS:
        _LISTINGS[key] = [e for e in _url_entries(key) if not e.name.startswith(".")]
    return _LISTINGS[key]


def _entry(path: str) -> Entry | None:
    return next((e for e in entries(dirname(path)) if e.path == path), None)


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(local(path))
    if _hub_repo(path):
        return True
    try:
        e = _entry(path)
    except InputError:  # the parent cannot be listed (a bucket root, a server's top): ask it
        e = None
    return e.is_dir if e is not None else bool(entries(path))


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(local(path))
    e = _entry(path)
    return bool(e and not e.is_dir)


def exists(path: str) -> bool:
    return os.path.exists(local(path)) if not is_url(path) else _entry(path) is not None


def stat(path: str, fresh: bool = True) -> tuple[int, str]:
    """(size in bytes, version) of a file. Local: the mtime in ns (and inode, ctime) is the
    version. URLs: the listing's or a HEAD request's size and ETag/Last-Modified; ``fresh=False``
    takes the version discovery recorded in the disk cache, if any (no request)."""
    if not is_url(path):
        try:
            st = os.stat(local(path))
        except OSError as e:
            raise InputError(path, f"cannot read: {e.strerror or e}") from None
        return st.st_size, f"{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
    if path in _STATS:
        return _STATS[path]
    if not fresh and (known := _cached_stat(path)) is not None:
        _STATS[path] = known
        return known
    fs, p = _fs(path)
    try:
        info = fs.info(p)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except Exception as e:  # noqa: BLE001
        raise _failed(path, "looking up the file", e) from None
    if info.get("size") is None:
        raise InputError(path, "the server does not report the file's size")
    _STATS[path] = (int(info["size"]), _version(info))
    return _STATS[path]


# ---------------------------------------------------------------- reads and the disk cache


def cache_root() -> str:
    """Folder of the disk cache of remote bytes."""
    if os.environ.get("THERMOSCOPE_CACHE"):
        return os.environ["THERMOSCOPE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "thermoscope", "remote")


def _url_dir(url: str) -> str:
    h = hashlib.sha256(url.encode()).hexdigest()
    return os.path.join(cache_root(), h[:2], h)


def _cached_stat(url: str) -> tuple[int, str] | None:
    try:
        with open(os.path.join(_url_dir(url), "stat.json")) as f:
            size, version = json.load(f)
        return int(size), str(version)
    except (OSError, ValueError, TypeError):
        return None


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def record_stat(url: str) -> tuple[int, str]:
    """Look ``url`` up afresh and record its size and version in the disk cache (discovery)."""
    size, version = stat(url)
    if _cached_stat(url) != (size, version):
        _write_atomic(
            os.path.join(_url_dir(url), "stat.json"), json.dumps([size, version]).encode()
        )
    return size, version


def read_range(path: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a file: one ``pread`` locally, one ranged request (then the
    disk cache) for a URL. Raises ``InputError`` naming the file when the read fails or the
    file is shorter than ``end``."""
    if not is_url(path):
        try:
            with open(local(path), "rb", buffering=0) as f:
                data = os.pread(f.fileno(), end - start, start)
        except OSError as e:
            raise InputError(path, f"cannot read: {e.strerror or e}") from None
    else:
        data = _cached_range(path, start, end)
    if len(data) != end - start:
        raise InputError(path, f"file ended before byte {end} (read {len(data)} of {end - start})")
    return data


def _cached_range(url: str, start: int, end: int) -> bytes:
    size, version = stat(url, fresh=False)
    key = hashlib.sha256(f"{size}|{version}".encode()).hexdigest()[:16]
    path = os.path.join(_url_dir(url), f"{key}-{start}-{end}.bin")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        pass
    fs, p = _fs(url)
    failure = None
    try:
        data = fs.cat_file(p, start=start, end=end)
    except Exception as e:  # noqa: BLE001 - any transport error becomes one line
        failure = f"reading bytes [{start}, {end}) failed ({type(e).__name__}: {str(e)[:160]})"
    if failure:  # raised outside the handler: no unpicklable transport error travels with it
        raise InputError(url, failure)
    if len(data) == end - start:
        _write_atomic(path, data)
    return data


def read_uncached(url: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` straight from the server (the pre-flight's rate probe)."""
    fs, p = _fs(url)
    failure = None
    try:
        return fs.cat_file(p, start=start, end=end)
    except Exception as e:  # noqa: BLE001
        failure = f"reading bytes [{start}, {end}) failed ({type(e).__name__}: {str(e)[:160]})"
    raise InputError(url, failure)


def read_bytes(path: str, limit: int) -> bytes:
    """A whole small file (an index, a log, a config), refused when over ``limit`` bytes."""
    size, _ = stat(path) if is_url(path) else (os.path.getsize(local(path)), "")
    if size > limit:
        raise InputError(path, f"file is {size} bytes, over the {limit}-byte limit for it")
    return read_range(path, 0, size)
