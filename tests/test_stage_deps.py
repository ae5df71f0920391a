"""dvc.yaml lists, for each stage, every pipeline source file the stage's code imports.

A stage whose deps miss a module it runs would not rerun when that module changes: DVC would
serve stale results. The closure is static (``pipeline.core.code``): the stage script, the
stage's function in ``pipeline/stages.py`` (its own lazy imports plus the module's), and every
module those import, transitively.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.core.code import PACKAGE_DIR, import_closure

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _imports(nodes) -> set[str]:
    names = set()
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.ImportFrom) and sub.module:
                names.add(sub.module)
                names.update(f"{sub.module}.{a.name}" for a in sub.names)
            elif isinstance(sub, ast.Import):
                names.update(a.name for a in sub.names)
    return names


def stage_modules(stage: str) -> set[str]:
    """Modules the stage's script and its function in pipeline/stages.py import directly."""
    tree = ast.parse((PACKAGE_DIR / "stages.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    body = [
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in (stage, "run_stage")
    ]
    script = ast.parse((REPO / "stages" / f"{stage}.py").read_text())
    # pipeline.stages itself is the file below, not its closure (that holds every stage)
    return {m for m in _imports(top + body + [script]) if not m.startswith("pipeline.stages")}


def stage_files(stage: str) -> set[Path]:
    return import_closure(stage_modules(stage)) | {PACKAGE_DIR / "stages.py"}


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_imported_module_is_a_dependency(stage):
    deps = [d if isinstance(d, str) else next(iter(d)) for d in STAGES[stage]["deps"]]
    files = stage_files(stage)
    assert len(files) > 3  # the closure found the stage's code
    missing = sorted(str(f.relative_to(REPO)) for f in files if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage '{stage}' imports but does not depend on {missing}"


def test_a_missing_dependency_is_detected():
    """The check itself can fail: the measure stage without pipeline/estimators is caught."""
    deps = [d for d in STAGES["measure"]["deps"] if d != "pipeline/estimators"]
    files = import_closure(stage_modules("measure"))
    assert any(not _covered(f, deps) for f in files)
