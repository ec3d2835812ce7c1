"""``rmserve lab bon --reuse REPORT``: start from a previous report's scores instead of scoring again.

A report (``bon.json`` names each label's target, ``raw-scores.jsonl.gz`` holds every score) already
holds the scores of its targets for its candidates. A new run over the same candidates that adds a proxy
need not ask the servers of the others again: each target of the new run whose label the report scored,
with the same model, aggregate and options (``Target.fingerprint``; the URL may differ), has its score
cache written from the report, and ``score_all`` then skips its group. The candidates must be the
report's: the same prompt ids, and per candidate the same length in tokens and characters; anything else
is refused. A target the report scored under another spec is scored anew (and said so). The report's
throughput of the groups copied whole is kept, so the new report's table still shows what they cost.
``REUSED_FILE`` in the scores folder records what came from where, for the new ``bon.json``.

The copied scores are what the report's servers answered: a gold or proxy retrained since is not
checked here (score a few prompts with it and compare, as ``bench/lab_hh.py`` does).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from rmserve.lab.candidates import iter_candidates
from rmserve.lab.scoring import THROUGHPUT_FILE, GroupStats, cache_header, score_file
from rmserve.lab.targets import Target, parse_target

REUSED_FILE = "reused.json"


def check_same_candidates(records: Sequence[Mapping[str, Any]], candidates: Path, source: str) -> None:
    """Refuse candidates other than those ``records`` (a report's raw scores) were computed for.

    Raises:
        ValueError: a prompt is missing on either side, or a candidate's length differs (the message says
            which prompt).
    """
    by_id = {r["id"]: r for r in records}
    seen = 0
    for record in iter_candidates(candidates):
        previous = by_id.get(record.id)
        if previous is None:
            raise ValueError(
                f"{source} has no prompt {record.id}: it scored other candidates. Drop --reuse, or pass the "
                f"candidates it scored."
            )
        chars = [len(r) for r in record.responses]
        if previous["response_chars"] != chars or previous["response_tokens"] != record.response_tokens:
            raise ValueError(
                f"prompt {record.id}: its candidates differ from those {source} scored (lengths in tokens or "
                f"characters); drop --reuse, or pass the candidates it scored."
            )
        seen += 1
    if seen != len(by_id):
        raise ValueError(
            f"{source} scored {len(by_id)} prompts, the candidates hold {seen}; drop --reuse, or pass the "
            f"candidates it scored."
        )


def seed_caches(
    records: Sequence[Mapping[str, Any]],
    previous: Mapping[str, Any],
    targets: Sequence[Target],
    candidates: Path,
    scores_dir: Path,
    source: str,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Write the score caches of ``targets`` that the previous report scored alike (see the module
    docstring); caches that exist are left as they are (a resumed run). Returns the labels copied now.

    Args:
        records: the report's raw scores (``read_raw``).
        previous: the report's ``bon.json`` (its ``targets``, label -> spec, and ``throughput``).
        targets: the new run's targets.
        candidates: the new run's candidates.
        scores_dir: the new run's score caches.
        source: the report folder, for messages.

    Raises:
        ValueError: the candidates are not the report's, or the report lacks a target's scores.
    """
    specs: Mapping[str, str] = previous.get("targets") or {}
    if not specs:
        raise ValueError(f"{source}/bon.json names no targets; it cannot be reused.")
    check_same_candidates(records, candidates, source)
    scores_dir.mkdir(parents=True, exist_ok=True)
    copied: list[str] = []
    for target in targets:
        if target.label not in specs:
            continue
        if parse_target(specs[target.label]).fingerprint != target.fingerprint:
            echo(
                f"{target.label}: {source} scored {specs[target.label]!r}, not {target.spec!r}; scoring it anew"
            )
            continue
        path = score_file(scores_dir, target)
        if path.is_file():
            continue
        if any(target.label not in r["scores"] for r in records):
            raise ValueError(f"{source}: its raw scores lack {target.label!r}, which its bon.json names.")
        lines = [json.dumps({"id": r["id"], "scores": r["scores"][target.label]}) + "\n" for r in records]
        path.write_text(cache_header(target) + "".join(lines), encoding="utf-8")
        copied.append(target.label)
    names = {f.name for f in fields(GroupStats)}
    kept = [g for g in previous.get("throughput", []) if set(g["labels"]) <= set(copied)]
    with (scores_dir / THROUGHPUT_FILE).open("a", encoding="utf-8") as f:
        for group in kept:
            f.write(json.dumps({k: v for k, v in group.items() if k in names}) + "\n")
    if copied:
        record_path = scores_dir / REUSED_FILE
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        record.update({label: source for label in copied})
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        echo(f"{', '.join(copied)}: scores copied from {source}")
    return copied


def reused(scores_dir: Path) -> dict[str, str]:
    """Which labels' scores came from which report (empty when none did)."""
    path = scores_dir / REUSED_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
