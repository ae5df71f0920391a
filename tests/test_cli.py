"""The real ``thermoscope`` command, run as a subprocess on real files.

Every bad-input case of issue 5 gives exit code 2 and exactly one line on stderr naming the file
(and tensor) and the reason, never a traceback unless ``--debug``; ``check`` prints a verdict
table and computes nothing; ``--skip-bad`` records what it skipped in the store and the report;
NaN/Inf weights are counted per (step, layer) and analysed like any other data; ``--help``,
``--quiet`` and ``--json-log`` behave as documented.
"""

from __future__ import annotations

import html
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import checkpoint_factory as cf
import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import load_file

from pipeline.ingest.safetensors_io import read_header

REPO = Path(__file__).resolve().parents[1]
F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
NO_BIG_ALLOC = 1 << 30  # address-space limit of the bad-input runs: nothing absurd is allocated


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (NO_BIG_ALLOC, NO_BIG_ALLOC))


def start(*args, limit_memory: bool = False) -> subprocess.Popen:
    """``python -m pipeline.cli ARGS`` in the repository root, stdout/stderr captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_limit_memory if limit_memory else None,
    )


def thermoscope(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    p = start(*args)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def snapshot(root: Path) -> set[str]:
    """Every path under ``root`` (to prove a command wrote nothing)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---------------------------------------------------------------- bad input cases
# Each builder writes a real checkpoint folder under ``tmp`` and returns
# (folder to analyze, fragments the one-line message must contain, tensor named or None).


def _good(tmp: Path, steps=(1, 2, 3)) -> Path:
    cf.write_flat(tmp / "run", steps)
    return tmp / "run"


def _raw_bad(tmp, header, data=bytes(16), length=None) -> tuple[Path, str]:
    root = _good(tmp)
    return root, cf.write_raw(root / "step_000004.safetensors", header, data, length)


def truncated_file(tmp):
    root = _good(tmp)
    f = root / "step_000003.safetensors"
    hdr_len = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    spans = sorted(read_header(f).items(), key=lambda kv: kv[1][2])
    data_len = f.stat().st_size - hdr_len - 50
    first_over = next(name for name, (_, _, (_, end)) in spans if end > data_len)
    f.write_bytes(f.read_bytes()[:-50])  # a half-written file from a killed job
    return root, [str(f), "run past the end of the file"], first_over


def header_length_beyond_file(tmp):
    root, f = _raw_bad(tmp, {"a": F32x4}, length=99_000_000)
    return root, [f, "header length 99000000 runs past the end of the file"], None


def unparseable_header_json(tmp):
    root, f = _raw_bad(tmp, b'{"a": {"dtype": "F32",')
    return root, [f, "header is not valid JSON"], None


def unknown_dtype(tmp):
    root, f = _raw_bad(tmp, {"a": {**F32x4, "dtype": "F13"}})
    return root, [f, "unknown dtype 'F13'"], "a"


def offsets_past_end(tmp):
    root, f = _raw_bad(tmp, {"a": {**F32x4, "data_offsets": [16, 32]}})
    return root, [f, "run past the end of the file"], "a"


def directory_named_safetensors(tmp):
    root = _good(tmp)
    (root / "step_000004.safetensors").mkdir()
    return root, [str(root / "step_000004.safetensors"), "is a directory"], None


def _changed_last(tmp, change) -> tuple[Path, str]:
    root = _good(tmp)
    return root, cf.write_file(root / "step_000004.safetensors", change(cf.model_tensors(4)))


def shape_change(tmp):
    root, f = _changed_last(tmp, lambda t: {**t, "layers.2.weight": torch.zeros(8, 9)})
    return root, [f, "shape changes from (8, 8)", "to (8, 9)"], "layers.2.weight"


def dtype_change(tmp):
    root, f = _changed_last(tmp, lambda t: {**t, "layers.2.weight": t["layers.2.weight"].half()})
    return root, [f, "dtype changes from F32", "to F16"], "layers.2.weight"


def tensor_missing(tmp):
    root, f = _changed_last(tmp, lambda t: {k: v for k, v in t.items() if k != "layers.0.bias"})
    return root, [f, "missing here but present in"], "layers.0.bias"


def tensor_renamed(tmp):
    root, f = _changed_last(
        tmp,
        lambda t: {("layers.3.weight" if k == "layers.2.weight" else k): v for k, v in t.items()},
    )
    return root, [f, "renamed or removed?", "+1 more differences"], "layers.2.weight"


def duplicate_steps(tmp):
    (a,) = cf.write_flat(tmp / "run", [7], pattern="step_{step}.safetensors")
    (b,) = cf.write_flat(tmp / "run", [7], pattern="ckpt-{step:04d}.safetensors")
    cf.write_flat(tmp / "run", [8])
    return tmp / "run", [a, b, "duplicate step 7"], None


def unparseable_step(tmp):
    cf.write_trainer(tmp / "run", [1, 2])
    bad = tmp / "run" / "checkpoint-final"
    cf.write_file(bad / "model.safetensors", cf.model_tensors(3))
    return tmp / "run", [str(bad), "step 'final' in the folder name is not an integer"], None


def no_step_in_file_name(tmp):
    root = _good(tmp)
    f = cf.write_file(root / "model.safetensors", cf.model_tensors(5))
    return root, [f, "no step number in the file name"], None


def empty_folder(tmp):
    (tmp / "run").mkdir()
    return tmp / "run", [str(tmp / "run"), "no checkpoints found"], None


def _sharded(tmp, edit) -> tuple[Path, str]:
    cf.write_trainer(tmp / "run", [1, 2], sharded=True)
    index = tmp / "run" / "checkpoint-2" / "model.safetensors.index.json"
    obj = json.loads(index.read_text())
    edit(obj["weight_map"])
    index.write_text(json.dumps(obj))
    return tmp / "run", str(index)


def index_names_missing_shard(tmp):
    root, index = _sharded(
        tmp, lambda wm: wm.update({"layers.0.bias": "model-00009-of-00009.safetensors"})
    )
    return (
        root,
        [index, "shard 'model-00009-of-00009.safetensors' named in weight_map does not exist"],
        "layers.0.bias",
    )


def index_names_path_outside(tmp):
    outside = cf.write_file(tmp / "elsewhere" / "secret.safetensors", cf.model_tensors(2))
    rel = os.path.relpath(outside, tmp / "run" / "checkpoint-2")
    root, index = _sharded(tmp, lambda wm: wm.update({k: rel for k in wm}))
    return root, [index, f"weight_map names {rel!r}, outside the checkpoint folder"], None


def absurd_header_size(tmp):
    root, f = _raw_bad(tmp, {"a": F32x4}, length=2**63 + 5)
    return root, [f, "header length 9223372036854775813 exceeds the 100000000-byte limit"], None


CASES = {
    f.__name__: f
    for f in [
        truncated_file,
        header_length_beyond_file,
        unparseable_header_json,
        unknown_dtype,
        offsets_past_end,
        directory_named_safetensors,
        shape_change,
        dtype_change,
        tensor_missing,
        tensor_renamed,
        duplicate_steps,
        unparseable_step,
        no_step_in_file_name,
        empty_folder,
        index_names_missing_shard,
        index_names_path_outside,
        absurd_header_size,
    ]
}
PREFIX = "thermoscope analyze: error: "


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_file_and_reason(tmp_path, case):
    root, fragments, tensor = CASES[case](tmp_path)
    store = tmp_path / "out.zarr"
    before = snapshot(tmp_path)
    plain = start("analyze", root, "--store", store, limit_memory=True)
    debug = start("analyze", root, "--store", store, "--debug", limit_memory=True)
    out, err = plain.communicate(timeout=60)
    dout, derr = debug.communicate(timeout=60)

    assert plain.returncode == 2, err
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(PREFIX), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    if tensor:
        assert f"tensor '{tensor}'" in line, line

    assert debug.returncode == 2, derr
    assert "Traceback (most recent call last)" in derr and "InputError" in derr
    assert derr.splitlines()[-1] == line  # the same one-line message closes the traceback
    assert snapshot(tmp_path) == before  # no store, no cache, nothing


def test_json_log_error_is_one_json_line(tmp_path):
    root, fragments, _ = truncated_file(tmp_path)
    r = thermoscope("--json-log", "analyze", root, "--store", tmp_path / "out.zarr")
    assert r.returncode == 2
    (line,) = r.stderr.splitlines()
    event = json.loads(line)
    assert event["event"] == "error" and event["command"] == "analyze"
    assert all(f in event["message"] for f in fragments)


# ---------------------------------------------------------------- check
def test_check_prints_verdicts_and_exits_1_on_bad_files(tmp_path):
    root, (bad, _), tensor = truncated_file(tmp_path)
    (root / "step_000009.safetensors").mkdir()
    before = snapshot(tmp_path)
    r = thermoscope("check", root)
    assert r.returncode == 1, r.stderr
    assert r.stderr == ""
    verdicts = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(ok|error)\s+(\S+)\s+(.*)$", line)
        if m:
            verdicts[m.group(2)] = (m.group(1), m.group(3))
    assert verdicts["step_000001.safetensors"][0] == "ok"
    assert verdicts["step_000002.safetensors"][0] == "ok"
    assert verdicts["step_000003.safetensors"][0] == "error"
    assert f"tensor '{tensor}'" in verdicts["step_000003.safetensors"][1]
    assert "run past the end of the file" in verdicts["step_000003.safetensors"][1]
    assert verdicts["step_000009.safetensors"] == (
        "error",
        "is a directory, not a safetensors file",
    )
    assert re.search(r"^\d+ checked, 2 error\(s\)", r.stdout.splitlines()[-1])
    assert snapshot(tmp_path) == before  # computes nothing, writes nothing


def test_check_exits_0_when_all_ok(tmp_path):
    cf.write_trainer(tmp_path / "sweep" / "a", [1, 2], sharded=True)
    cf.write_flat(tmp_path / "sweep" / "b", [1, 2, 3])
    before = snapshot(tmp_path)
    r = thermoscope("check", tmp_path / "sweep")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if re.match(r"^(ok|error) ", line)]
    assert rows and all(line.startswith("ok ") for line in rows)
    assert "0 error(s)" in r.stdout
    assert snapshot(tmp_path) == before
    j = thermoscope("--json-log", "check", tmp_path / "sweep")
    assert j.returncode == 0 and j.stdout == ""
    done = json.loads(j.stderr.splitlines()[-1])
    assert done["event"] == "done" and done["bad"] == 0 and done["files"] == len(rows)


# ---------------------------------------------------------------- --skip-bad, NaN/Inf, --quiet
STEPS = list(range(0, 130, 10))
DIVERGES_AT = 70  # from this step on, layers.2.weight holds NaN and +-Inf
BROKEN = "layers.2.weight"
TRUNCATED_STEP = 40


def _diverging_tensors(step: int) -> dict[str, torch.Tensor]:
    t = cf.model_tensors(step)
    if step >= DIVERGES_AT:
        w = t[BROKEN]
        w[0, : 1 + step // 40] = float("nan")
        w[1, 0] = float("inf")
        w[2, 1] = -float("inf")
    return t


@pytest.fixture(scope="module")
def diverging(tmp_path_factory):
    """A real run whose layers.2.weight diverges (NaN/Inf) and one of whose checkpoints was cut
    short, analysed with --skip-bad --quiet, then rendered with report --json-log."""
    tmp = tmp_path_factory.mktemp("diverging")
    run = tmp / "run"
    files = {
        s: cf.write_file(run / f"step_{s:06d}.safetensors", _diverging_tensors(s)) for s in STEPS
    }
    (run / "trainer_state.json").write_text(json.dumps(cf.trainer_state(STEPS)))
    bad = Path(files.pop(TRUNCATED_STEP))
    bad.write_bytes(bad.read_bytes()[:-100])
    store, report = tmp / "out.zarr", tmp / "report"
    analyzed = thermoscope(
        "analyze", run, "--store", store, "--skip-bad", "--workers", "1", "--quiet"
    )
    reported = thermoscope("--json-log", "report", store, "--out", report)
    return {
        "files": files,
        "bad": str(bad),
        "store": store,
        "report": report,
        "analyzed": analyzed,
        "reported": reported,
    }


def test_quiet_analyze_prints_nothing(diverging):
    r = diverging["analyzed"]
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""


def test_skip_bad_records_skipped_checkpoint_in_store(diverging):
    assert diverging["analyzed"].returncode == 0, diverging["analyzed"].stderr
    tree = xr.open_datatree(diverging["store"], engine="zarr")
    skipped = json.loads(tree.attrs["skipped"])
    assert [p for p, _ in skipped] == [diverging["bad"]]
    assert "run past the end of the file" in skipped[0][1]
    ds = tree["run"].to_dataset()
    assert list(ds.step.values) == sorted(diverging["files"])


def test_report_lists_skipped_and_nonfinite(diverging):
    r = diverging["reported"]
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    events = [json.loads(line) for line in r.stderr.splitlines()]  # --json-log: JSON lines only
    assert events[-1]["event"] == "done" and events[-1]["report"].endswith("index.html")
    page = html.unescape((diverging["report"] / "index.html").read_text())
    assert os.path.basename(diverging["bad"]) in page
    assert "run past the end of the file" in page
    nonfinite = page[page.index("Non-finite values") :]
    assert BROKEN in nonfinite[:4000]


def test_nonfinite_counted_exactly_where_they_are(diverging):
    ds = xr.open_datatree(diverging["store"], engine="zarr")["run"].to_dataset()
    steps = list(ds.step.values)
    layers = [str(x) for x in ds.layer.values]
    expected = np.array(
        [
            [
                int((~torch.isfinite(load_file(diverging["files"][s])[name])).sum())
                for name in layers
            ]
            for s in steps
        ]
    )
    assert expected.sum() > 0 and (expected[:, layers.index(BROKEN)] > 0).sum() == sum(
        s >= DIVERGES_AT for s in steps
    )
    np.testing.assert_array_equal(ds.nonfinite_count.values, expected)

    # statistics of the broken layer use its finite values: exact against the file
    last = load_file(diverging["files"][steps[-1]])[BROKEN].double()
    finite = last[torch.isfinite(last)]
    assert ds.weight_rms.sel(step=steps[-1], layer=BROKEN).item() == pytest.approx(
        float(finite.square().mean().sqrt()), rel=1e-6
    )

    # the unaffected layers are estimated as usual: finite statistics at every step, finite
    # displacements after the first, and a temperature wherever one exists, diverged or not
    healthy = [n for n in layers if n != BROKEN]
    for name in ("weight_mean", "weight_rms", "gaussian_entropy", "weight_entropy"):
        assert np.isfinite(ds[name].sel(layer=healthy[1:]).values).all(), (
            name
        )  # [0] is the 8-value bias
    for name in ("weight_mean", "weight_rms", "gaussian_entropy"):
        assert np.isfinite(ds[name].sel(layer=healthy).values).all(), name
    assert np.isfinite(ds.msd.sel(layer=healthy).values[1:]).all()
    # the healthy layers' temperature cells are judged on their own data (this fixture's
    # weights are independent draws, not a diffusion: refused as spacing too coarse), never
    # as missing values because another layer diverged; a value exactly where reason is 0
    reason = ds.temperature_reason.sel(layer=healthy).values
    assert reason.size and not (reason == 6).any()
    assert (np.isfinite(ds.temperature.sel(layer=healthy).values) == (reason == 0)).all()


# ---------------------------------------------------------------- help
@pytest.mark.parametrize("command", ["analyze", "report", "check"])
def test_help_shows_examples_and_exit_codes(command):
    r = thermoscope(command, "--help")
    assert r.returncode == 0 and r.stderr == ""
    assert "examples:" in r.stdout and f"thermoscope {command} " in r.stdout
    assert "exit codes:" in r.stdout
    for code in ("0 ok", "1 check found bad files", "2 bad input"):
        assert code in r.stdout
    for option in ("--debug", "--quiet", "--json-log"):
        assert option in r.stdout


def test_spectral_every_implies_spectral_and_spaces_the_spectra(tmp_path):
    """``--spectral-every 2``: spectra (2-D layers) at checkpoints 0, 2, 4, ... of the run and
    NaN between, without ``--spectral`` on the line; recorded in the store's attributes."""
    cf.write_flat(tmp_path / "run", range(0, 60, 10))
    r = thermoscope("analyze", tmp_path / "run", "--store", tmp_path / "s.zarr", "--quiet",
                    "--spectral-every", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    tree = xr.open_datatree(tmp_path / "s.zarr", engine="zarr")
    ds = tree["run"].to_dataset()
    entropy = ds.spectral_entropy.sel(layer="layers.2.weight").values
    assert np.isfinite(entropy[::2]).all() and np.isnan(entropy[1::2]).all()
    assert tree.attrs["spectral"] == 1 and tree.attrs["spectral_every"] == 2
