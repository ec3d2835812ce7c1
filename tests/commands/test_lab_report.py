"""The committed over-optimisation results recompute from their raw scores: docs/lab/<condition>/.

Each condition's ``raw-scores.jsonl.gz`` (every candidate's score under the gold and every proxy) gives,
through ``rmserve lab bon --from-scores``, the committed ``bon.md`` table exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from rmserve.cli import app

LAB_DOCS = Path(__file__).resolve().parents[2] / "docs" / "lab"
CONDITIONS = sorted(p.parent for p in LAB_DOCS.glob("*/raw-scores.jsonl.gz"))


@pytest.mark.parametrize("condition", CONDITIONS, ids=[p.name for p in CONDITIONS])
def test_the_committed_table_recomputes_from_the_raw_scores(condition, tmp_path):
    result = CliRunner().invoke(
        app, ["lab", "bon", "--from-scores", str(condition / "raw-scores.jsonl.gz"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bon.md").read_text() == (condition / "bon.md").read_text()


def test_reuse_without_a_report_says_what_to_pass(tmp_path):
    (tmp_path / "c").mkdir()
    result = CliRunner().invoke(
        app,
        ["lab", "bon", "--candidates", str(tmp_path / "c"), "--gold", "http://127.0.0.1:9", "--proxy",
         "http://127.0.0.1:9", "--out", str(tmp_path / "out"), "--reuse", str(tmp_path / "none")],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "no bon.json there; pass a `rmserve lab bon` --out folder" in result.output
