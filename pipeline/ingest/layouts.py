"""The one place that knows how trainers name their checkpoint folders and files.

Checkpoint folders inside a run folder (``FOLDER_PATTERNS``; the step is the number shown):

=============================  ==========================================  ===============
layout                         example                                     step from
=============================  ==========================================  ===============
Hugging Face Trainer           ``checkpoint-1000/``                        folder name
``checkpoint-N-epoch-M``       ``checkpoint-1000-epoch-2/``                folder name
``step_N`` / ``stepN``         ``step_1000/``, ``step1000/``               folder name
OLMo                           ``step1000-unsharded/``, ``step1000-tokens4B``  folder name
DeepSpeed                      ``global_step1000/``                        folder name
Accelerate ``save_state``      ``checkpoints/checkpoint_3/``               trainer_state.json,
                                                                           metadata, else the
                                                                           save index (3)
=============================  ==========================================  ===============

Accelerate numbers its folders by save count, not by step, so its number is used only when
nothing better is recorded (and discovery says so). Files that hold weights in a format other
than safetensors are recognised by ``foreign_format`` and never opened: the caller reports
what was found and the command that converts it.
"""

from __future__ import annotations

import fnmatch
import re

from pipeline.ingest import remote

#: name -> regex of a checkpoint folder; group ``step`` is the step (or the save index).
FOLDER_PATTERNS: dict[str, re.Pattern] = {
    "trainer": re.compile(r"^checkpoint-(?P<step>\d+)$"),
    "trainer-epoch": re.compile(r"^checkpoint-(?P<step>\d+)-epoch-\d+$"),
    "step": re.compile(r"^step[_-]?(?P<step>\d+)(?:-unsharded|-tokens\d+[A-Za-z]?)?$"),
    "deepspeed": re.compile(r"^global_step(?P<step>\d+)$"),
    "checkpoint_": re.compile(r"^checkpoint_(?P<step>\d+)$"),
}
#: Accelerate ``save_state(automatic_checkpoint_naming=True)``: ``<project>/checkpoints/``
ACCELERATE_PARENT = "checkpoints"
#: a name that looks like a checkpoint folder but whose step is not an integer (reported)
_MALFORMED = re.compile(r"^checkpoint[-_](?P<raw>.*)$")


def match_folder(name: str) -> tuple[str, int] | None:
    """(layout, number) when ``name`` is a checkpoint folder name, else None."""
    for layout, pattern in FOLDER_PATTERNS.items():
        m = pattern.match(name)
        if m:
            return layout, int(m.group("step"))
    return None


def malformed_folder(name: str) -> str | None:
    """The non-integer step of a ``checkpoint-<x>`` folder name (to report), else None."""
    m = _MALFORMED.match(name)
    return m.group("raw") if m and match_folder(name) is None else None


def checkpoint_folders(run_dir: str) -> list[tuple[int | None, str]]:
    """(number, path) of the checkpoint folders of ``run_dir`` (local or URL), by number;
    number None for a ``checkpoint-<x>`` folder whose step is malformed (to report it)."""
    found = []
    for e in remote.entries(run_dir):
        if not e.is_dir:
            continue
        if m := match_folder(e.name):
            found.append((m[1], e.path))
        elif malformed_folder(e.name) is not None:
            found.append((None, e.path))
        elif e.name == ACCELERATE_PARENT:
            found += [
                (m[1], c.path)
                for c in remote.entries(e.path)
                if c.is_dir and (m := match_folder(c.name))
            ]
    return sorted(found, key=lambda x: (x[0] is None, x[0] or 0, x[1]))


def step_is_index(layout: str, parent_name: str) -> bool:
    """True when the folder's number counts saves rather than steps (Accelerate)."""
    return layout == "checkpoint_" and parent_name == ACCELERATE_PARENT


# (glob over file names, what it is, the command that converts it to safetensors)
_PICKLE_CMD = (
    "python -c \"import torch, safetensors.torch as st; st.save_file(torch.load('{f}', "
    "map_location='cpu', weights_only=True), '{stem}.safetensors')\""
)
FOREIGN_FORMATS: list[tuple[str, str, str]] = [
    (
        "*.distcp",
        "FSDP distributed checkpoint shards (.distcp)",
        "accelerate merge-weights {dir} {dir}-merged",
    ),
    (
        "*zero_pp_rank_*_states.pt",
        "DeepSpeed ZeRO shards",
        "python {dir}/zero_to_fp32.py {dir} {dir}-fp32 --safe_serialization",
    ),
    (
        "mp_rank_*_model_states.pt",
        "DeepSpeed model states",
        "python {dir}/zero_to_fp32.py {dir} {dir}-fp32 --safe_serialization",
    ),
    ("*.bin", "a pickled PyTorch file (.bin)", _PICKLE_CMD),
    ("*.pt", "a pickled PyTorch file (.pt)", _PICKLE_CMD),
    ("*.pth", "a pickled PyTorch file (.pth)", _PICKLE_CMD),
    (
        "*.ckpt",
        "a pickled Lightning checkpoint (.ckpt)",
        _PICKLE_CMD.replace("weights_only=True)", "weights_only=True)['state_dict']"),
    ),
]
#: Trainer side files that are not weights (never reported as a foreign weights format)
SIDE_FILES = (
    "optimizer.*",
    "optim*.pt",
    "scheduler.*",
    "rng_state*",
    "random_states_*",
    "training_args.bin",
    "train.pt",
    "scaler.pt",
)


def foreign_format(folder: str, names: list[str]) -> str | None:
    """One line naming the non-safetensors weights among ``names`` (files of ``folder``) and
    the command that converts them, or None when there are none. Nothing is opened."""
    weights = [n for n in names if not any(fnmatch.fnmatch(n, s) for s in SIDE_FILES)]
    for glob, what, cmd in FOREIGN_FORMATS:
        hits = sorted(n for n in weights if fnmatch.fnmatch(n, glob))
        if hits:
            f = f"{folder}/{hits[0]}"
            stem = f.rsplit(".", 1)[0]
            more = f" (+{len(hits) - 1} more)" if len(hits) > 1 else ""
            return (
                f"no .safetensors file; found {what}: {hits[0]}{more} (not opened: "
                f"never unpickled); convert with: {cmd.format(dir=folder, f=f, stem=stem)}"
            )
    return None
