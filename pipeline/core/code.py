"""Which source files a piece of the pipeline runs: the static import closure of a module.

One answer serves two needs: the measure cache keys cached layers by the source of every file
the kernel imports (a change to any of them invalidates the cache), and a test checks that each
DVC stage's ``deps`` in dvc.yaml cover every file its code imports. Static (the source's
``import`` statements, including those inside functions), so nothing is imported to find out.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # pipeline/
PACKAGE = PACKAGE_DIR.name


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` of this package (a package's ``__init__.py``), or
    None when ``name`` is outside the package or names no module (an attribute)."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(source: Path) -> set[str]:
    """Modules named by the import statements of ``source`` (``from a import b`` gives both
    ``a`` and ``a.b``: b may be a submodule)."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> [a, a.b, a.b.c]: importing a submodule runs its packages' __init__ too."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_closure(modules: Iterable[str]) -> set[Path]:
    """Every source file of this package that importing (and running) ``modules`` can load."""
    todo, files = [m for name in modules for m in _with_parents(name)], set()
    while todo:
        path = module_file(todo.pop())
        if path is None or path in files:
            continue
        files.add(path)
        todo.extend(m for name in _imported_names(path) for m in _with_parents(name))
    return files


def source_digest(modules: Iterable[str]) -> str:
    """sha256 over the source of ``import_closure(modules)``, in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(import_closure(modules)):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
