"""params.yaml -> typed settings for each stage (one place that knows the file's shape)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .errors import InputError

if TYPE_CHECKING:
    from .measure import MeasureSettings
    from .parallel import ClusterSettings


def load_params(path="params.yaml") -> dict:
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(path, f"cannot read parameters ({exc.__class__.__name__}: {exc})") from None


def _build(cls, section: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = set(section) - known
    if unknown:
        raise InputError("params.yaml", f"unknown keys in '{where}': {sorted(unknown)}")
    return cls(**section)


# The settings classes live beside the code they configure (torch, Dask): imported on use, so
# reading params.yaml stays light for the stages that need neither (the index stage).
def measure_settings(params: dict) -> MeasureSettings:
    from .measure import MeasureSettings

    return _build(MeasureSettings, params.get("measure") or {}, "measure")


def cluster_settings(params: dict) -> ClusterSettings:
    from .parallel import ClusterSettings

    return _build(ClusterSettings, params.get("dask") or {}, "dask")
