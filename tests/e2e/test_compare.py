"""The merged-vs-MoE load-test driver: real servers, real locust, a report with one row per (model, users)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from loadtests.compare import main
from rmserve.training.upcycle import upcycle


def test_compare_writes_table_plot_and_figures(tiny_model_dirs, tmp_path):
    if not (shutil.which("locust") or (Path(sys.executable).parent / "locust").exists()):
        pytest.skip("locust is not installed (pip install -e '.[loadtest]')")
    moe = tmp_path / "tiny-moe"
    upcycle(tiny_model_dirs["llama"], moe, experts=4, top_k=2, seed=0)
    out = tmp_path / "report"

    main(["--models", str(tiny_model_dirs["llama"]), str(moe), "--users", "2", "1", "--seconds", "3",
          "--server-arg=--dtype=float32", "--out", str(out)])  # fmt: skip

    runs = json.loads((out / "compare.json").read_text())
    assert [(r["model"], r["users"]) for r in runs] == [
        ("llama", 1),
        ("llama", 2),
        ("tiny-moe", 1),
        ("tiny-moe", 2),
    ]
    for run in runs:
        assert run["requests"] > 0 and run["failures"] == 0 and run["error_rate"] == 0
        assert run["requests_per_s"] > 0
        assert 5 < run["tokens_per_s"] / run["requests_per_s"] < 2000  # tokens per HH dialogue, from /metrics
        assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
    table = (out / "compare.md").read_text()
    assert "| model | users | requests | req/s | tokens/s | p50 ms | p95 ms | p99 ms | errors |" in table
    assert table.count("| tiny-moe |") == 2 and table.count("| llama |") == 2
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_unbounded_runs(capsys):
    with pytest.raises(SystemExit):
        main(["--seconds", "3600"])
    assert "--seconds must be between 1 and 600" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--users", "0"])
    assert "every --users count must be between 1 and 256" in capsys.readouterr().err
