"""Real servers on 127.0.0.1 for the remote-series tests: an HTTP file server that honours
Range requests (and counts the bytes it sends), moto's standalone S3 server, and a local
stand-in for the Hugging Face Hub's fsspec filesystem (same ``repo@revision/path`` layout)."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import threading
from pathlib import Path

from fsspec.spec import AbstractFileSystem


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Directory listings and files; ``Range: bytes=a-b`` gets a 206 with just those bytes.
    Counts body bytes sent; ranged requests reaching an offset of a file in ``server.fail``
    ({path relative to the root: first failing byte}) get a 503 (a network fault)."""

    def log_message(self, *args):  # quiet
        pass

    def end_headers(self):
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def send_head(self):
        path = self.translate_path(self.path)
        if os.path.isdir(path) or not os.path.isfile(path):
            return super().send_head()
        st = os.stat(path)
        rng = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        start, end = (
            (0, st.st_size - 1) if not rng else (int(rng[1]), int(rng[2] or st.st_size - 1))
        )
        end = min(end, st.st_size - 1)
        fail_at = self.server.fail.get(self.path.split("?")[0].lstrip("/"))
        if rng and fail_at is not None and end >= fail_at:
            self.send_error(503, "injected fault")
            return None
        f = open(path, "rb")  # noqa: SIM115 - closed by copyfile's caller
        f.seek(start)
        self.send_response(206 if rng else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("ETag", f'"{st.st_size}-{st.st_mtime_ns}"')
        self.send_header("Last-Modified", self.date_time_string(int(st.st_mtime)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end}/{st.st_size}")
        self.end_headers()
        self._left = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        left = getattr(self, "_left", None)
        if left is None:
            return super().copyfile(source, outputfile)
        while left > 0:
            # 64 KiB chunks: the server shares the test's process, so its buffers count in a
            # tracemalloc peak meant for the reader (a 1 MiB chunk made that test flaky)
            chunk = source.read(min(left, 1 << 16))
            if not chunk:
                break
            with self.server.lock:  # counted before it is written: a client that has the
                self.server.bytes_sent += len(chunk)  # bytes always sees them counted
                self.server.requests += 1
            outputfile.write(chunk)
            left -= len(chunk)


@contextlib.contextmanager
def http_server(root):
    """Serve folder ``root`` on 127.0.0.1; yields the server (``url``, ``bytes_sent``,
    ``requests``, ``fail``: {relative path: first failing byte})."""
    handler = lambda *a, **k: _RangeHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.bytes_sent, server.requests, server.fail = 0, 0, {}
    server.lock = threading.Lock()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def s3_server():
    """moto's standalone S3 server on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def upload(fs, local_root, bucket_path: str) -> int:
    """Put every file under ``local_root`` at ``bucket_path`` (same relative paths); bytes."""
    total = 0
    for p in sorted(Path(local_root).rglob("*")):
        if p.is_file():
            fs.pipe_file(f"{bucket_path}/{p.relative_to(local_root).as_posix()}", p.read_bytes())
            total += p.stat().st_size
    return total


class _Branch:
    def __init__(self, name):
        self.name = name


class _Refs:
    def __init__(self, names):
        self.branches = [_Branch(n) for n in names]


class _LocalApi:
    """The part of ``huggingface_hub.HfApi`` that listing step revisions uses."""

    def __init__(self, base):
        self.base = base

    def list_repo_refs(self, repo_id, repo_type="model"):
        return _Refs(sorted(os.listdir(os.path.join(self.base, repo_id))))


class LocalHub(AbstractFileSystem):
    """``hf://<owner>/<repo>@<revision>/<path>`` served from ``<base>/<owner>/<repo>/<revision>/
    <path>`` (revision ``main`` when none is given), with ``_api.list_repo_refs`` listing the
    revision folders as branches: the Hub's layout without the network."""

    protocol = "hf"
    base = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._api = _LocalApi(self.base)

    def _local(self, path: str) -> str:
        path = self._strip_protocol(path)
        owner, repo_rev, *rest = path.split("/")
        repo, _, rev = repo_rev.partition("@")
        return os.path.join(self.base, owner, repo, rev or "main", *rest)

    def _hub(self, local: str) -> str:
        owner, repo, rev, *rest = Path(local).relative_to(self.base).parts
        return "/".join([owner, f"{repo}@{rev}", *rest])

    def ls(self, path, detail=True, **kwargs):
        d = self._local(path)
        if os.path.isfile(d):
            out = [self.info(path)]
        else:
            out = [self.info(self._hub(os.path.join(d, n))) for n in sorted(os.listdir(d))]
        return out if detail else [o["name"] for o in out]

    def info(self, path, **kwargs):
        p = self._local(path)
        if not os.path.exists(p):
            raise FileNotFoundError(path)
        kind = "directory" if os.path.isdir(p) else "file"
        size = os.path.getsize(p) if kind == "file" else 0
        return {"name": self._strip_protocol(path), "size": size, "type": kind, "etag": str(size)}

    def cat_file(self, path, start=None, end=None, **kwargs):
        with open(self._local(path), "rb") as f:
            f.seek(start or 0)
            return f.read(None if end is None else end - (start or 0))
