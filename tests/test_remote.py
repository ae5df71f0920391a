"""Remote series through fsspec against real servers on 127.0.0.1: an HTTP server honouring
Range requests and moto's S3 server. A remote series' store equals the local analysis of the
same files; reads are byte ranges, cached on disk (a rerun sends nothing); a network fault
names the file and keeps the layers already measured. ``hf://`` step revisions (Pythia
``stepN``, OLMo ``stepN-tokensM``) against a local filesystem with the Hub's layout."""

from __future__ import annotations

from pathlib import Path

import checkpoint_factory as cf
import fsspec
import pytest
from remote_servers import LocalHub, http_server, s3_server, upload

from pipeline.analyze import analyze
from pipeline.core.errors import InputError
from pipeline.ingest import remote
from pipeline.ingest.discovery import discover
from pipeline.settings import ClusterSettings, MeasureSettings
from pipeline.store.zarr_io import open_tree
from pipeline.testing.compare import largest_differences

SETTINGS = MeasureSettings(max_lag=2, ensemble_window=3, entropy_sample=256, block_elems=2**15)
THREADS = ClusterSettings(n_workers=2, processes=False)
PROCESSES = ClusterSettings(n_workers=2, processes=True)


def _series(root: Path) -> Path:
    """A Trainer-layout run (trainer_state.json log, config.json) of 5 bf16 checkpoints of the
    tiny model plus one 384 x 512 layer (384 KiB a checkpoint), so headers are a small part."""
    import json

    import torch

    run = root / "run"
    steps = [0, 10, 20, 30, 40]
    for s in steps:
        g = torch.Generator().manual_seed(s)
        tensors = {**cf.model_tensors(s), "big.weight": torch.randn(384, 512, generator=g)}
        d = run / f"checkpoint-{s}"
        cf.write_file(d / "model.safetensors", {k: v.bfloat16() for k, v in tensors.items()})
        (d / "trainer_state.json").write_text(json.dumps(cf.trainer_state(steps[: s // 10 + 1])))
        (d / "config.json").write_text(json.dumps({"hidden_act": "gelu"}))
    return run


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def _same(store, reference) -> float:
    diffs = largest_differences(open_tree(store), open_tree(reference))
    assert diffs, "nothing compared"
    return max(v for v in diffs.values() if v == v)


@pytest.fixture(scope="module")
def local_series(tmp_path_factory):
    root = tmp_path_factory.mktemp("series")
    run = _series(root)
    store = analyze(run, root / "local.zarr", SETTINGS, THREADS, cache_dir=root / "cache")
    return run, store


def test_http_series_equals_local_and_rereads_nothing(local_series, tmp_path):
    run, local_store = local_series
    with http_server(run.parent) as server:
        url = f"{server.url}/run"
        manifest = discover(url)
        assert manifest.runs[0].steps == [0, 10, 20, 30, 40]
        assert manifest.runs[0].log.source == f"{url}/checkpoint-40/trainer_state.json"
        assert manifest.runs[0].checkpoints[0].files["layers.0.weight"].startswith("http://")
        store = analyze(url, tmp_path / "http.zarr", SETTINGS, PROCESSES, cache_dir=tmp_path / "c")
        assert _same(store, local_store) == 0
        first = server.bytes_sent
        series = _size(run)
        print(f"http: {first} bytes read for a {series}-byte series ({first / series:.3f}x)")
        assert first <= 1.1 * series  # each byte once (+ headers and logs)
        # a fresh measurement cache: every byte again, from the disk cache, none from the server
        analyze(url, tmp_path / "again.zarr", SETTINGS, PROCESSES, cache_dir=tmp_path / "c2")
        assert server.bytes_sent - first < 65536  # the index stage's listings only
        assert _same(tmp_path / "again.zarr", local_store) == 0


def test_s3_series_equals_local(local_series, tmp_path, monkeypatch):
    run, local_store = local_series
    with s3_server() as endpoint:
        for k, v in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(k, v)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("series")
        sent = upload(fs, run, "series/run")
        fsspec.filesystem("s3").invalidate_cache()
        store = analyze(
            "s3://series/run", tmp_path / "s3.zarr", SETTINGS, THREADS, cache_dir=tmp_path / "c"
        )
        assert _same(store, local_store) == 0
        assert sent >= _size(run)


def test_network_fault_names_the_file_and_keeps_measured_layers(local_series, tmp_path):
    run, local_store = local_series
    with http_server(run.parent) as server:
        url = f"{server.url}/run"
        manifest = discover(url)
        last = run / "checkpoint-40" / "model.safetensors"
        # the server fails for the last tensor of one file, after discovery read the headers
        server.fail["run/checkpoint-40/model.safetensors"] = last.stat().st_size - 8
        with pytest.raises(InputError) as e:
            analyze(
                url,
                tmp_path / "x.zarr",
                SETTINGS,
                THREADS,
                cache_dir=tmp_path / "c",
                manifest=manifest,
            )
        assert "checkpoint-40/model.safetensors" in str(e.value) and "503" in str(e.value)
        kept = list((tmp_path / "c").rglob("*.npz"))
        assert 0 < len(kept) < len(manifest.runs[0].tensors)
        server.fail.clear()
        store = analyze(url, tmp_path / "x.zarr", SETTINGS, THREADS, cache_dir=tmp_path / "c")
        assert _same(store, local_store) == 0


def test_unreachable_server_is_one_line():
    with http_server(Path(".")) as server:
        url = f"{server.url}/nothing-here"
    with pytest.raises(InputError) as e:
        discover(url)
    assert url in str(e.value) and "\n" not in str(e.value)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A Pythia-like repo (branches main, step0, step1000, step2000) and an OLMo-like one
    (step1000-tokens4B, step2000-tokens8B) served as hf:// by ``LocalHub``."""
    for rev, step in [("step0", 0), ("step1000", 1000), ("step2000", 2000), ("main", 2000)]:
        cf.write_file(
            tmp_path / "EleutherAI/pythia-tiny" / rev / "model.safetensors", cf.model_tensors(step)
        )
    for rev, step in [("step1000-tokens4B", 1000), ("step2000-tokens8B", 2000)]:
        cf.write_file(
            tmp_path / "allenai/olmo-tiny" / rev / "model.safetensors", cf.model_tensors(step)
        )
    monkeypatch.setattr(LocalHub, "base", str(tmp_path))
    fsspec.register_implementation("hf", LocalHub, clobber=True)
    yield tmp_path
    fsspec.register_implementation("hf", "huggingface_hub.HfFileSystem", clobber=True)
    LocalHub.clear_instance_cache()


def test_hub_step_revisions_names():
    branches = ["main", "step1000", "step20", "step2000-tokens8B", "stepx", "refs/pr/1"]
    assert remote.hub_step_revisions(branches) == [
        (20, "step20"),
        (1000, "step1000"),
        (2000, "step2000-tokens8B"),
    ]


@pytest.mark.parametrize(
    "repo, steps, rev",
    [
        ("EleutherAI/pythia-tiny", [0, 1000, 2000], "step1000"),
        ("allenai/olmo-tiny", [1000, 2000], "step1000-tokens4B"),
    ],
)
def test_hub_repo_is_a_series_of_step_revisions(local_hub, repo, steps, rev):
    entries = remote.entries(f"hf://{repo}")
    assert [e.path for e in entries][steps.index(1000)] == f"hf://{repo}@{rev}"
    run = discover(f"hf://{repo}").runs[0]
    assert run.steps == steps and run.name == repo.split("/")[1]
    assert run.checkpoints[steps.index(1000)].files["layers.0.weight"] == (
        f"hf://{repo}@{rev}/model.safetensors"
    )
    from pipeline.ingest.safetensors_io import read_rows

    got = read_rows(run.checkpoints[-1].files["layers.2.weight"], "layers.2.weight", 1, 3)
    assert (got == cf.model_tensors(2000)["layers.2.weight"][1:3]).all()


def test_cache_key_follows_the_file_version(tmp_path):
    with http_server(tmp_path) as server:
        path = cf.write_file(tmp_path / "a.safetensors", cf.model_tensors(1))
        url = f"{server.url}/a.safetensors"
        remote.forget()
        remote.record_stat(url)
        before = remote.read_range(url, 0, 16)
        cf.write_file(path, cf.model_tensors(1, seed=3, buffers=True))  # re-saved in place
        remote.forget()
        remote.record_stat(url)
        assert remote.read_range(url, 0, 16) == Path(path).read_bytes()[:16] != before


def test_a_row_block_costs_its_bytes_not_the_file(tmp_path):
    """One block of a 16 MiB tensor: the server sends that block (plus the header) and the
    reader's peak Python allocation is a small multiple of the block, as for a local file."""
    import tracemalloc

    import torch

    from pipeline.ingest.safetensors_io import load_header, read_rows

    big = torch.randn(4096, 1024)
    path = cf.write_file(tmp_path / "big.safetensors", {"w": big})
    with http_server(tmp_path) as server:
        url = f"{server.url}/big.safetensors"
        load_header(url)  # header + version, as the index stage does
        before = server.bytes_sent
        tracemalloc.start()
        rows = read_rows(url, "w", 1000, 1064)  # 64 rows = 256 KiB
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        block = 64 * 1024 * 4
        assert server.bytes_sent - before == block
        assert peak < 3 * block, peak
        assert torch.equal(rows, big[1000:1064])
        print(
            f"block {block} B: sent {server.bytes_sent - before} B, peak {peak} B "
            f"of a {Path(path).stat().st_size}-byte file"
        )


def test_index_stage_takes_a_url_as_checkpoints_dir(local_series, tmp_path):
    from dataclasses import replace

    from pipeline.core.manifest import Manifest
    from pipeline.settings import Settings
    from pipeline.stages import index

    run, _ = local_series
    with http_server(run.parent) as server:
        settings = Settings.from_params({"checkpoints": {"dir": f"{server.url}/run"}})
        paths = replace(settings.paths, manifest=str(tmp_path / "m.json"))
        index(replace(settings, paths=paths))
    manifest = Manifest.from_json((tmp_path / "m.json").read_text())
    assert manifest.root == f"{server.url}/run" and manifest.runs[0].steps == [0, 10, 20, 30, 40]
