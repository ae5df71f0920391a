"""The real DVC pipeline (dvc.yaml + stages/ + params.yaml) on a small series outside the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from checkpoint_factory import write_flat

REPO = Path(__file__).resolve().parents[1]


def _dvc(cwd: Path, *args: str) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _project(tmp_path: Path, series: Path) -> Path:
    """A copy of the project's pipeline definition in a fresh git + DVC repository."""
    work = tmp_path / "project"
    work.mkdir()
    for name in ("dvc.yaml", "stages", "pipeline"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["checkpoints"]["dir"] = str(series)
    params["dask"]["n_workers"] = 1
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    _dvc(work, "init", "-q")
    return work


def _set_dir(work: Path, series: Path) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["checkpoints"]["dir"] = str(series)
    (work / "params.yaml").write_text(yaml.safe_dump(params))


def test_repro_then_noop_then_rerun_on_changed_folder(tmp_path):
    write_flat(tmp_path / "series_a", range(0, 200, 10))
    write_flat(tmp_path / "series_b", range(0, 200, 10), seed=1)
    work = _project(tmp_path, tmp_path / "series_a")

    first = _dvc(work, "repro")
    for stage in ("index", "measure", "thermo", "report"):
        assert f"Running stage '{stage}'" in first
    assert (work / "data/report/index.html").stat().st_size > 10_000
    assert not (work / "data/demo").exists()  # pointing at a user folder trains nothing

    second = _dvc(work, "repro")
    for stage in ("measure", "thermo", "report"):
        assert f"Running stage '{stage}'" not in second, second

    _set_dir(work, tmp_path / "series_b")
    third = _dvc(work, "repro")
    for stage in ("index", "measure", "thermo", "report"):
        assert f"Running stage '{stage}'" in third
    metrics = _dvc(work, "metrics", "show")
    assert "series_b.n_steps" in metrics
