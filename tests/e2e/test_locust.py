"""The locust file drives a real server without errors (headless, bounded in users and seconds)."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rmserve.launch import CLEAN_EXIT, start_server

ROOT = Path(__file__).resolve().parents[2]


def test_locustfile_drives_single_and_batched_rollouts_without_failures(tiny_model_dirs, tmp_path):
    locust = shutil.which("locust") or str(Path(sys.executable).parent / "locust")
    if not Path(locust).exists():
        pytest.skip("locust is not installed (pip install -e '.[loadtest]')")
    server = start_server(
        ["--model", str(tiny_model_dirs["llama"]), "--dtype", "float32"], tmp_path / "server.log"
    )
    try:
        run = subprocess.run(
            [locust, "-f", str(ROOT / "loadtests" / "locustfile.py"), "--host", server.url, "--headless",
             "-u", "4", "-r", "4", "-t", "6s", "--csv", str(tmp_path / "run"), "--only-summary"],
            capture_output=True, text=True, timeout=120, env={"RMSERVE_LOAD_BATCH": "4", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
    finally:
        assert server.stop() == CLEAN_EXIT, server.log_text()
    assert run.returncode == 0, run.stderr[-3000:]
    with (tmp_path / "run_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    for name in ("/v1/score [1]", "/v1/score [4]"):
        assert int(rows[name]["Request Count"]) > 0, rows.keys()
        assert int(rows[name]["Failure Count"]) == 0
    assert int(rows["/v1/score [1] inference"]["Request Count"]) > 0  # timing headers recorded
    assert int(rows["Aggregated"]["Failure Count"]) == 0
