"""Every knob of the pipeline, typed, in one place: params.yaml -> ``Settings``.

One dataclass per params.yaml section; their defaults are the only defaults (params.yaml
repeats them for the reader). Stdlib and yaml only, so reading the settings costs the light
stages (index, report) no torch or Dask import. Decisions that combine a setting with the
environment (the scheduler to join, whether local workers are forked processes) are
properties here, made once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from pipeline.core.errors import InputError


@dataclass(frozen=True)
class CheckpointSettings:
    """params.yaml ``checkpoints``: the series to analyse."""

    # a run folder or a sweep folder (folder of run folders); local, or s3://, gs://, https://,
    # hf:// (see ingest/remote.py)
    dir: str = "data/demo"
    # skip unreadable checkpoints (recorded in the store) instead of failing
    skip_bad: bool = False
    # LoRA adapter series: the base model's safetensors file or folder (layers are W0 + dW);
    # None: the adapted layers are the update dW alone
    base_model: str | None = None
    # LoRA adapter series: also analyse the raw A and B of each adapted module
    lora_raw: bool = False
    # checkpoints to analyse: "START:STOP" (steps, inclusive), "::K" (every K-th), both
    # "START:STOP:K"; None: all (ingest/selection.py)
    steps: str | None = None
    # layers to analyse: comma-separated globs ("*attn*"), or "re:<regex>"; None: all
    layers: str | None = None


@dataclass(frozen=True)
class DemoSettings:
    """params.yaml ``demo``: the bundled demo series is generated when checkpoints.dir is here."""

    dir: str = "data/demo"


@dataclass(frozen=True)
class MeasureSettings:
    """params.yaml ``measure``: the streaming measurement (stage measure)."""

    # checkpoints back for the squared-distance band
    max_lag: int = 8
    # coordinates per layer for the value entropy (the same at every step; ~3e-3 nats)
    entropy_sample: int = 2**16
    # elements per row block: one Dask task, the unit of parallelism
    block_elems: int = 2**22
    # checkpoints per ensemble-entropy window
    ensemble_window: int = 8
    # SVD metrics of 2-D+ weights (a 2-D layer is then one block, read once more per checkpoint)
    spectral: bool = False
    # with spectral: spectra of every k-th checkpoint only (index 0, k, 2k, ... of the run;
    # NaN elsewhere), k times less SVD work
    spectral_every: int = 1
    # elements per cache slice (CPU); task memory ~ slice x 4 B x (max_lag + max(max_lag,
    # ensemble_window) + 1)
    slice_elems: int = 2**17
    # "auto": cuda where the worker sees a GPU
    device: str = "auto"

    def __post_init__(self):
        if self.spectral_every < 1:
            raise InputError(
                "params.yaml", f"measure.spectral_every must be >= 1, got {self.spectral_every}"
            )


@dataclass(frozen=True)
class ThermoSettings:
    """params.yaml ``thermo``: the derivation (stage thermo)."""

    # widest temperature window, in checkpoint intervals (<= measure.max_lag); centred on the step
    temperature_window: int = 8
    # narrowest window (at the ends of the series), in intervals; fewer checkpoints: no T
    temperature_min_window: int = 4
    # rounding noise subtracted: "auto" (fp32 files on the bf16 grid = pure-bf16 training:
    # none; bf16 files: export rounding of fp32 master weights), "storage" or "none"
    rounding_correction: str = "auto"
    # checkpoints over which the macroscopic state must be stationary
    equilibrium_window: int = 8
    equilibrium_rel_tol: float = 0.05
    # a plateau is stationary when its loss and global T change by less than this (relative)
    # over the run's second half; only stationary plateaus enter the sweep fits
    stationarity_rel_tol: float = 0.05
    # step of a data shift (Type II state temperature), or None
    data_shift_step: int | None = None
    # the optimizer that relates displacement to temperature: auto (the optimizer state saved
    # with the checkpoints; plain SGD when a run has no state and no Trainer files) | sgd |
    # sgd_momentum | nesterov | adam | adamw (METHODS.md 3b)
    optimizer: str = "auto"
    # gradient-clipping threshold of the runs (Trainer default 1.0; null: no clipping); the
    # logged grad_norm above it marks clipped steps
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        known = ("auto", "sgd", "sgd_momentum", "nesterov", "adam", "adamw")
        if self.optimizer not in known:
            raise InputError(
                "params.yaml", f"thermo.optimizer must be one of {known}, got {self.optimizer!r}"
            )


@dataclass(frozen=True)
class ClusterSettings:
    """params.yaml ``dask``: where the measurement tasks run."""

    # join this cluster instead of starting one (or DASK_SCHEDULER_ADDRESS)
    scheduler_address: str | None = None
    # local cluster size; None = one per core
    n_workers: int | None = None
    # per worker, Dask syntax ("4GiB")
    memory_limit: str = "auto"
    # "auto": GPU workers when CUDA is visible; "off": never
    gpu: str = "auto"
    # local workers as processes forked from a preloaded server (True), or threads (False)
    processes: bool = True
    # seconds a local cluster of worker processes stays up after the last run left it, for the
    # next run to join (measure/resident.py); 0: none; None: 300
    keep_alive_s: float | None = None

    @property
    def keep_alive(self) -> float:
        """Seconds (0: off): ``THERMOSCOPE_KEEP_ALIVE`` when set (a test harness or CI turns
        resident clusters off for every command it runs), else ``keep_alive_s``, else 300."""
        if os.environ.get("THERMOSCOPE_KEEP_ALIVE"):
            return float(os.environ["THERMOSCOPE_KEEP_ALIVE"])
        return 300.0 if self.keep_alive_s is None else float(self.keep_alive_s)

    @property
    def address(self) -> str | None:
        """The scheduler to join: the setting, else ``DASK_SCHEDULER_ADDRESS``, else None."""
        return self.scheduler_address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None

    @property
    def forks_local_workers(self) -> bool:
        """True when this run starts local worker processes (forked from the forkserver)."""
        return self.processes and not self.address


@dataclass(frozen=True)
class PathSettings:
    """params.yaml ``paths``: every output of the pipeline (dvc.yaml names the same paths)."""

    manifest: str = "data/manifest.json"
    measured: str = "data/measure.zarr"
    store: str = "data/thermo.zarr"
    report: str = "data/report"
    cache: str = "data/.cache"


@dataclass(frozen=True)
class Settings:
    """The whole of params.yaml."""

    checkpoints: CheckpointSettings = field(default_factory=CheckpointSettings)
    demo: DemoSettings = field(default_factory=DemoSettings)
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    thermo: ThermoSettings = field(default_factory=ThermoSettings)
    dask: ClusterSettings = field(default_factory=ClusterSettings)
    paths: PathSettings = field(default_factory=PathSettings)

    @classmethod
    def from_params(cls, params: dict | None) -> Settings:
        """Build from a params.yaml mapping; unknown sections or keys are a one-line error."""
        params = params or {}
        sections = {f.name: f.default_factory for f in fields(cls)}
        unknown = set(params) - set(sections)
        if unknown:
            raise InputError("params.yaml", f"unknown sections: {sorted(unknown)}")
        return cls(
            **{name: _build(make, params.get(name), name) for name, make in sections.items()}
        )


def _build(make, section: dict | None, where: str):
    section = section or {}
    known = {f.name for f in fields(make)}
    unknown = set(section) - known
    if unknown:
        raise InputError("params.yaml", f"unknown keys in '{where}': {sorted(unknown)}")
    return make(**section)


def load_params(path="params.yaml") -> dict:
    """The raw params.yaml mapping (a one-line error naming the file when it cannot be read)."""
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(
            path, f"cannot read parameters ({exc.__class__.__name__}: {exc})"
        ) from None


def load_settings(path="params.yaml") -> Settings:
    """params.yaml -> ``Settings``."""
    return Settings.from_params(load_params(path))


def thermo_settings(thermo: ThermoSettings | dict | None) -> ThermoSettings:
    """Accept the typed settings or a raw ``thermo`` mapping (the Python API takes either)."""
    if isinstance(thermo, ThermoSettings):
        return thermo
    return _build(ThermoSettings, thermo, "thermo")
