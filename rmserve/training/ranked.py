"""DMoERM's training data: ranked responses with an optional task category and capability labels.

One JSON object a line (gzipped if the file ends in ``.gz``), either a TRL preference pair or a ranked
list, with two optional keys:

- pairs: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` in every shape ``training.pairs`` reads;
- lists: ``{"prompt": str | [messages], "responses": [best, ..., worst]}`` (or without ``prompt``: each
  response a whole text or conversation), two or more responses, best first;
- ``"category": str``: the task category (DMoERM's outer layer); every line has one, or none does;
- ``"capabilities": {"<point>": "chosen" | "rejected" | "tie"}``: which response of a pair is better in
  terms of that capability point (``rmserve dmoerm label`` writes them); pairs only.

A list of k responses expands to its ``C(k, 2)`` ordered pairs, each weighing ``1 / C(k, 2)``: the
listwise Bradley-Terry loss of the paper's eq. 7.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from rmserve.models.inputs import RewardInput
from rmserve.training.pairs import SHAPES_HELP, PreferenceExample, response_input

Verdict = Literal["chosen", "rejected", "tie"]
VERDICTS: tuple[Verdict, ...] = ("chosen", "rejected", "tie")
LIST_HELP = (
    'or a ranked list {"prompt": ..., "responses": [best, ..., worst]}; optional keys "category": str and, '
    'on pairs, "capabilities": {"point": "chosen" | "rejected" | "tie"}'
)


@dataclass(frozen=True)
class RankedItem:
    """One prompt's responses, best first, with its category and capability labels.

    Attributes:
        responses: the scored inputs, best first (two for a pair).
        prompt: the prompt as given (a string, a message list, or None), for labelling.
        texts: the responses as given, for labelling.
        category: the task category, or None.
        capabilities: per capability point, which response of a pair is better.
    """

    responses: tuple[RewardInput, ...]
    prompt: Any
    texts: tuple[Any, ...]
    category: str | None = None
    capabilities: dict[str, Verdict] = field(default_factory=dict)

    def pairs(self) -> list[PreferenceExample]:
        """Every ordered pair of the ranking, each weighing ``1 / C(k, 2)``."""
        weight = (
            1.0 if len(self.responses) == 2 else 1 / (len(self.responses) * (len(self.responses) - 1) / 2)
        )
        return [PreferenceExample(a, b, weight) for a, b in combinations(self.responses, 2)]

    def capability_pair(self, capability: str) -> PreferenceExample | None:
        """The pair ordered by one capability's label (None: unlabelled or a tie)."""
        verdict = self.capabilities.get(capability)
        if verdict == "chosen":
            return PreferenceExample(self.responses[0], self.responses[1])
        if verdict == "rejected":
            return PreferenceExample(self.responses[1], self.responses[0])
        return None


def ranked_item(record: Any) -> RankedItem:
    """The item of one JSON record; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    prompt = record.get("prompt")
    if "responses" in record:
        texts = record["responses"]
        if not isinstance(texts, list) or len(texts) < 2:
            raise ValueError("'responses' must be a list of two or more responses, best first")
        if "capabilities" in record:
            raise ValueError("capability labels compare two responses: give them on pairs, not on lists")
    else:
        missing = [key for key in ("chosen", "rejected") if key not in record]
        if missing:
            raise ValueError(f"missing key {missing[0]!r}")
        texts = [record["chosen"], record["rejected"]]
    responses = tuple(response_input(prompt, text) for text in texts)
    category = record.get("category")
    if category is not None and (not isinstance(category, str) or not category):
        raise ValueError(f"'category' must be a non-empty string, got {category!r}")
    labels = record.get("capabilities", {})
    if not isinstance(labels, dict) or any(
        not isinstance(k, str) or not k or v not in VERDICTS for k, v in labels.items()
    ):
        raise ValueError(
            f"'capabilities' must map capability names to one of {', '.join(VERDICTS)}, got {labels!r}"
        )
    return RankedItem(responses, prompt, tuple(texts), category, dict(labels))


def read_records(path: Path) -> list[tuple[int, Any]]:
    """The JSON value of every non-blank line of a JSONL(.gz) file, with its line number.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a line is not JSON (the message names the file and the line).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; pass a JSONL(.gz) file of preference pairs or ranked lists."
        )
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except ValueError as exc:
                    raise ValueError(
                        f"{path}:{number}: not JSON ({exc}); {SHAPES_HELP}; {LIST_HELP}."
                    ) from None
    return records


def write_records(path: Path, records: Sequence[Any]) -> None:
    """Write JSON values one a line (gzipped if ``path`` ends in ``.gz``), atomically."""
    partial = path.with_name(path.name + ".partial")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(partial, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    partial.replace(path)


def read_ranked(path: Path) -> list[RankedItem]:
    """Every item of a JSONL(.gz) file, in file order (blank lines skipped).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a line is malformed (the message names the file, the line and the accepted shapes),
            some lines have a category and others not, or the file holds no item.
    """
    items: list[RankedItem] = []
    for number, record in read_records(path):
        try:
            items.append(ranked_item(record))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(
                f"{path}:{number}: invalid {where}: {first['msg']}; {SHAPES_HELP}; {LIST_HELP}."
            ) from None
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}; {SHAPES_HELP}; {LIST_HELP}.") from None
    if not items:
        raise ValueError(f"{path} holds no item; write one JSON object a line ({SHAPES_HELP}; {LIST_HELP}).")
    with_category = sum(item.category is not None for item in items)
    if 0 < with_category < len(items):
        raise ValueError(
            f"{path}: {with_category} of {len(items)} lines have a 'category' and the rest do not; give every line "
            "one (the router learns from them) or none (one category, no router)."
        )
    return items


def capability_names(items: list[RankedItem]) -> list[str]:
    """The capability points labelled anywhere in ``items``, in order of first appearance."""
    return list(dict.fromkeys(name for item in items for name in item.capabilities))
