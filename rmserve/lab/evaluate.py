"""``rmserve lab bon``: score candidates with a gold and proxy targets, then write the best-of-n report.

Outputs in ``out``: ``scores/`` (the resumable per-target caches), ``raw-scores.jsonl.gz`` (one line a
prompt: ``{"id", "response_tokens", "response_chars", "scores": {label: [...]}}``, the gold's label being
``gold``), ``bon.md`` (the table), ``bon.png`` (the plot) and ``bon.json`` (the curves, the settings and
each server's throughput). ``report`` rebuilds the report from a raw-scores file alone; ``reuse`` (a
previous report folder) copies the scores it holds of the same targets instead of asking their servers
(``rmserve.lab.reuse``).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rmserve.lab.bon import Curve, bon_curves
from rmserve.lab.report import markdown_table, plot, write_curves
from rmserve.lab.reuse import reused, seed_caches
from rmserve.lab.scoring import SCORES_DIR, collect_scores, read_throughput, score_all
from rmserve.lab.targets import Target, check_labels

GOLD = "gold"
RAW_FILE = "raw-scores.jsonl.gz"
TABLE_FILE, PLOT_FILE, CURVES_FILE = "bon.md", "bon.png", "bon.json"


def write_raw(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """The raw scores, one gzipped JSON line a prompt (``mtime=0``: the same scores give the same bytes)."""
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for record in records:
            f.write((json.dumps(record, separators=(",", ":")) + "\n").encode())


def read_raw(path: Path) -> list[dict[str, Any]]:
    """Every record of a raw-scores file.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a record lacks scores, or the gold's scores.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; `rmserve lab bon` writes {RAW_FILE} in its --out folder.")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records or any(GOLD not in r.get("scores", {}) for r in records):
        raise ValueError(f"{path}: every line needs 'scores' with the gold's ({GOLD!r}).")
    return records


def report(
    records: Sequence[dict[str, Any]],
    out: Path,
    *,
    bootstrap: int = 1000,
    extra: dict[str, Any] | None = None,
) -> list[Curve]:
    """Best-of-n curves of every proxy (and the gold as its own proxy: the oracle) into the report files."""
    labels = [label for label in records[0]["scores"] if label != GOLD]
    tokens = all(r["response_tokens"] for r in records)
    lengths = [r["response_tokens"] if tokens else r["response_chars"] for r in records]
    curves = bon_curves([r["scores"] for r in records], lengths, [*labels, GOLD], GOLD, bootstrap=bootstrap)
    unit = "tokens" if tokens else "characters"
    count = len(records[0]["scores"][GOLD])
    title = f"best-of-n on {len(records)} prompts x {count} candidates"
    out.mkdir(parents=True, exist_ok=True)
    intro = (
        f"Best-of-n: gold reward of each proxy's pick (mean over {len(records)} prompts, 95% bootstrap interval "
        f"over prompts, {bootstrap} resamples); the `gold` row picks by the gold itself (the oracle).\n\n"
    )
    (out / TABLE_FILE).write_text(intro + markdown_table(curves, unit))
    plot(curves, out / PLOT_FILE, title, oracle=GOLD)
    write_curves(
        curves,
        out / CURVES_FILE,
        {"prompts": len(records), "candidates": count, "length_unit": unit, **(extra or {})},
    )
    return curves


def run_bon(
    candidates: Path,
    gold: Target,
    proxies: Sequence[Target],
    out: Path,
    *,
    concurrency: int = 4,
    timeout: float = 600.0,
    bootstrap: int = 1000,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    reuse: Path | None = None,
) -> list[Curve]:
    """Score ``candidates`` with the gold and every proxy through their servers (those ``reuse``, a
    previous report folder, scored alike are copied from it), then report.

    Raises:
        LabError: a server is unreachable or answers badly.
        ValueError: labels repeat, a cache belongs to another target, the candidates are malformed, or
            they are not those of the ``reuse`` report.
        FileNotFoundError: the candidates, or the ``reuse`` report's files, are missing.
    """
    gold = Target(GOLD, gold.url, gold.model, gold.aggregate, gold.options)
    targets = [gold, *proxies]
    check_labels(targets)
    if reuse is not None:
        if not (reuse / CURVES_FILE).is_file():
            raise FileNotFoundError(
                f"--reuse {reuse}: no {CURVES_FILE} there; pass a `rmserve lab bon` --out folder."
            )
        previous = json.loads((reuse / CURVES_FILE).read_text())
        seed_caches(
            read_raw(reuse / RAW_FILE), previous, targets, candidates, out / SCORES_DIR, str(reuse), echo
        )
    score_all(
        targets,
        candidates,
        out / SCORES_DIR,
        concurrency=concurrency,
        timeout=timeout,
        progress=progress,
        echo=echo,
    )
    records = collect_scores(targets, candidates, out / SCORES_DIR)
    write_raw(out / RAW_FILE, records)
    extra = {
        "targets": {t.label: t.spec for t in targets},
        "throughput": read_throughput(out / SCORES_DIR),
        "reused": reused(out / SCORES_DIR),
    }
    curves = report(records, out, bootstrap=bootstrap, extra=extra)
    echo(f"wrote {out / TABLE_FILE}, {out / PLOT_FILE}, {out / CURVES_FILE} and {out / RAW_FILE}")
    return curves
