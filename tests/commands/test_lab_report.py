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
