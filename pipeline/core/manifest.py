"""The manifest: what the index stage found in a checkpoint folder (headers and logs only).

Later stages depend on the manifest instead of re-scanning (or hashing) checkpoint bytes.
All paths are absolute. Runs, checkpoints and tensors are in a fixed order: runs by name,
checkpoints by step, tensors in natural order (``layers.2`` before ``layers.10``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# optimizer kinds a run's optimizer record can name (ingest/optimizer_state.py): Adam family
# (preconditioned by the second moment) and SGD family; anything else is "unknown"
ADAM_KINDS = ("adam", "adamw")
SGD_KINDS = ("sgd", "sgd_momentum", "nesterov")


@dataclass(frozen=True)
class TensorSource:
    """How a virtual tensor is computed instead of read: a LoRA update of one adapted module.

    Rows [a, b) are ``scale * (B @ A)[a:b]`` (``(B @ A).T`` when ``fan_in_fan_out``: the base
    weight is stored (in, out), GPT-2's Conv1D), plus ``W0[a:b]`` of ``base_name`` in
    ``base_file`` when a base model is given. ``lora_a`` / ``lora_b`` are tensor names in the
    checkpoint's own (adapter) file; ``base_digest`` identifies the base file's header, size
    and mtime (the measure cache keys on it); the byte counts feed the pre-flight estimate."""

    lora_a: str
    lora_b: str
    rank: int  # r: rows of A
    scale: float
    fan_in_fan_out: bool = False
    base_file: str | None = None
    base_name: str | None = None
    base_digest: str | None = None
    factor_bytes: int = 0  # bytes of A and B in each adapter file (read at every checkpoint)
    base_bytes: int = 0  # bytes of W0 (the same rows at every checkpoint: read once)


@dataclass(frozen=True)
class TensorInfo:
    """One named parameter tensor as declared in a safetensors header, or a virtual tensor
    computed from stored ones (``source``; the LoRA update dW or W0 + dW of a module)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code: "F32", "F16", "BF16", "F64", ...
    source: TensorSource | None = None

    @property
    def n_params(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def rows(self) -> int:
        """Length of the first dimension (1 for a scalar): the axis measurement blocks split."""
        return self.shape[0] if self.shape else 1

    @property
    def row_elems(self) -> int:
        """Elements per row, i.e. the fan-in of a weight stored (out, in, ...)."""
        return max(1, self.n_params // max(self.rows, 1))


@dataclass(frozen=True)
class Checkpoint:
    """One saved step of a run. ``files`` maps each tensor name to the file that holds it
    (several files for sharded checkpoints). ``header_hash`` digests the headers, not data."""

    step: int
    files: dict[str, str]
    header_hash: str
    # optimizer state saved with this checkpoint: {"file", "step" (updates), "groups"
    # (hyperparameters per param group)}; empty when none (ingest/optimizer_state.py)
    optimizer: dict = field(default_factory=dict)


@dataclass
class TrainingLog:
    """Per-step scalars from the run's training log; NaN where not logged. ``loss_key`` and
    ``lr_key`` are the names the loss and learning rate had in that log (None: not found)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    source: str | None = None  # file (or DVCLive/TensorBoard folder) the log came from
    loss_key: str | None = None
    lr_key: str | None = None


@dataclass
class Run:
    """One training run: checkpoints in step order and the tensors they all share."""

    name: str
    path: str
    checkpoints: list[Checkpoint]
    tensors: list[TensorInfo]
    log: TrainingLog = field(default_factory=TrainingLog)
    activations: dict[str, str] = field(default_factory=dict)  # tensor name -> activation
    # optimizer kind, evidence, fallback note, state id and group per tensor, mapping checks
    # (ingest/optimizer_state.read_run_optimizer); empty for manifests written before it
    optimizer: dict = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]


@dataclass
class Manifest:
    """Everything found under ``root``; ``skipped`` lists (path, reason) of unusable files."""

    root: str
    runs: list[Run]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        runs = []
        for r in raw["runs"]:
            runs.append(
                Run(
                    name=r["name"],
                    path=r["path"],
                    checkpoints=[Checkpoint(**c) for c in r["checkpoints"]],
                    tensors=[_tensor_info(t) for t in r["tensors"]],
                    log=TrainingLog(**r["log"]),
                    activations=r["activations"],
                    optimizer=r.get("optimizer", {}),
                )
            )
        skipped = [tuple(s) for s in raw.get("skipped", [])]
        return cls(root=raw["root"], runs=runs, skipped=skipped)


def _tensor_info(t: dict) -> TensorInfo:
    source = TensorSource(**t["source"]) if t.get("source") else None
    return TensorInfo(t["name"], tuple(t["shape"]), t["dtype"], source)
