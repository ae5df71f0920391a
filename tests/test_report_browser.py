"""The report page in headless Chromium: it paints (screenshot not blank), its inline JS runs
without console errors, and the sortable table got its click handlers."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_fixture import build_store

from pipeline.report.render import render_report

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="/usr/bin/chromium not installed (apt-get install chromium)"
    ),
]


def chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def js_errors(stderr: str) -> list[str]:
    """Console messages and uncaught exceptions in Chromium's stderr (the page logs nothing)."""
    return [
        line for line in stderr.splitlines() if "Uncaught" in line or re.search(r":CONSOLE\b", line)
    ]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    store = build_store(root / "store.zarr", n_runs=2, nonfinite_at=(3, 1))
    return render_report(store, root / "report")


def test_screenshot_is_not_blank(page, tmp_path):
    shot = tmp_path / "shot.png"
    proc = chromium(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000")
    assert shot.exists(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 20  # text + heatmaps, not a white page
    assert (pixels < 128).mean() > 0.02
    assert js_errors(proc.stderr) == []


def test_inline_js_ran_and_wired_the_sortable_table(page, tmp_path):
    proc = chromium(page, tmp_path / "profile", "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    tables = page.read_text().split('<table class="sortable">')[1:]
    n_headers = sum(t.split("</thead>")[0].count("<th>") for t in tables)
    assert len(tables) == 2 and n_headers > 10  # sweep table + per-layer table
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-sortable-tables="{len(tables)}"' in body
    assert f'data-sortable-headers="{n_headers}"' in body
    assert js_errors(proc.stderr) == []


def test_detector_sees_a_broken_script(page, tmp_path):
    """Negative control: the same page with a failing script is caught by both checks."""
    broken = tmp_path / "broken.html"
    broken.write_text(
        page.read_text().replace("<script>", "<script>console.error('boom');missingFn();", 1)
    )
    proc = chromium(broken, tmp_path / "profile", "--dump-dom")
    assert len(js_errors(proc.stderr)) >= 2
    assert not re.search(r"<body[^>]*data-sortable-headers", proc.stdout)
