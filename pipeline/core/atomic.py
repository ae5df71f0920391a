"""Atomic replacement of files and folders: readers see the old version or the new one, never
a partial one (results already written are never damaged by a failed or killed run)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to a sibling temporary file, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def process_alive(pid: int) -> bool:
    """True when a process with this id runs (an exited one not yet reaped, a zombie, does
    not): whether the writer of a leftover temporary file, or a resident cluster, is still
    there."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # state: the field after the command name, which may itself hold ") "
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1][:1] != "Z"
    except OSError:  # no /proc (macOS): kill(0) is the answer
        return True


def replace_dir(tmp: Path, path: Path) -> None:
    """Replace folder ``path`` by the finished folder ``tmp`` with renames only; the old one is
    kept aside (``.<name>.old-*``) until the new one is in place, then removed."""
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
