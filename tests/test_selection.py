"""``--steps`` / ``--layers`` (and params.yaml ``checkpoints.steps`` / ``checkpoints.layers``)
and the pre-flight of ``thermoscope check``: bytes to read and the estimated time, with the
rate measured on a remote series (a Range HTTP server on 127.0.0.1)."""

from __future__ import annotations

import json
from dataclasses import replace

import checkpoint_factory as cf
import pytest
from remote_servers import http_server

from pipeline.cli import main
from pipeline.core.errors import InputError
from pipeline.core.manifest import Manifest
from pipeline.ingest.discovery import discover
from pipeline.ingest.selection import parse_steps, select
from pipeline.settings import Settings

STEPS = [0, 10, 20, 30, 40, 50]


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("100:2000", (100, 2000, 1)),
        ("::5", (None, None, 5)),
        ("10::2", (10, None, 2)),
        (":30", (None, 30, 1)),
    ],
)
def test_parse_steps(spec, parsed):
    assert parse_steps(spec) == parsed


@pytest.mark.parametrize("spec", ["5", "a:b", "::0", "1:2:3:4"])
def test_bad_steps_is_one_line(spec):
    with pytest.raises(InputError, match="--steps"):
        parse_steps(spec)


@pytest.mark.parametrize(
    "steps, layers, want_steps, want_layers",
    [
        ("10:30", None, [10, 20, 30], cf.NATURAL_ORDER),
        ("::2", None, [0, 20, 40], cf.NATURAL_ORDER),
        ("10::2", None, [10, 30, 50], cf.NATURAL_ORDER),
        (None, "*.weight", STEPS, ["layers.0.weight", "layers.2.weight", "layers.10.weight"]),
        (
            None,
            "layers.0.*,layers.10.*",
            STEPS,
            ["layers.0.bias", "layers.0.weight", "layers.10.weight"],
        ),
        (None, r"re:layers\.(2|10)\.", STEPS, ["layers.2.weight", "layers.10.weight"]),
    ],
)
def test_selection(tmp_path, steps, layers, want_steps, want_layers):
    cf.write_trainer(tmp_path / "run", STEPS)
    run = select(discover(tmp_path / "run"), steps, layers).runs[0]
    assert run.steps == want_steps and [t.name for t in run.tensors] == want_layers
    assert all(set(c.files) == set(want_layers) for c in run.checkpoints)


@pytest.mark.parametrize(
    "steps, layers, what",
    [("100:200", None, "selects no checkpoint"), (None, "*attn*", "matches no tensor")],
)
def test_empty_selection_names_the_run(tmp_path, steps, layers, what):
    cf.write_flat(tmp_path / "run", STEPS)
    with pytest.raises(InputError, match=what) as e:
        select(discover(tmp_path / "run"), steps, layers)
    assert e.value.path == str(tmp_path / "run")


def test_params_keys_select_in_the_index_stage(tmp_path):
    from pipeline.stages import index

    cf.write_flat(tmp_path / "run", STEPS)
    settings = Settings.from_params(
        {"checkpoints": {"dir": str(tmp_path / "run"), "steps": "::3", "layers": "*.bias"}}
    )
    settings = replace(settings, paths=replace(settings.paths, manifest=str(tmp_path / "m.json")))
    index(settings)
    run = Manifest.from_json((tmp_path / "m.json").read_text()).runs[0]
    assert run.steps == [0, 30] and [t.name for t in run.tensors] == ["layers.0.bias"]


def test_check_preflight_on_a_remote_series(tmp_path, capsys):
    cf.write_trainer(tmp_path / "run", STEPS)
    with http_server(tmp_path) as server:
        code = main(["check", f"{server.url}/run", "--steps", "::2", "--layers", "*.weight"])
        out = capsys.readouterr().out
        assert code == 0
        want = 3 * 4 * (8 * 4 + 8 * 8 + 4 * 8)  # 3 checkpoints x fp32 x the three weights
        assert f"pre-flight: {want} bytes to read" in out
        assert "measured now:" in out and "model.safetensors" in out and "MB/s" in out
        main(["--json-log", "check", f"{server.url}/run"])
        done = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert done["bytes_to_read"] == 6 * 4 * (8 * 4 + 8 + 8 * 8 + 4 * 8)
        assert done["estimated_seconds"][0] > 0


def test_check_preflight_local_uses_the_readme_rate(tmp_path, capsys):
    cf.write_flat(tmp_path / "run", STEPS)
    assert main(["check", str(tmp_path / "run")]) == 0
    assert "the README's local range" in capsys.readouterr().out


def test_analyze_measures_only_the_selection(tmp_path):
    from pipeline.analyze import analyze
    from pipeline.settings import ClusterSettings, MeasureSettings
    from pipeline.store.zarr_io import open_tree

    cf.write_trainer(tmp_path / "run", STEPS)
    settings = MeasureSettings(max_lag=1, ensemble_window=3, entropy_sample=64)
    store = analyze(
        tmp_path / "run",
        tmp_path / "s.zarr",
        settings,
        ClusterSettings(n_workers=1, processes=False),
        steps="::2",
        layers="re:weight$",
    )
    node = open_tree(store)["run"].dataset
    assert list(node.step.values) == [0, 20, 40]
    assert list(node.layer.values) == ["layers.0.weight", "layers.2.weight", "layers.10.weight"]
