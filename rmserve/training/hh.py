"""HH-RLHF preference data: dialogues as chat messages, preference pairs, and the fixed held-out split.

The shared file holds Anthropic's HH-RLHF harmless-base test split (MIT licence): one JSON object a line,
``{"chosen": str, "rejected": str}``, each a full dialogue ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``.
The two dialogues of a pair share every turn but the last assistant reply.

The split is fixed: pair indices ``0..n-1`` are shuffled by ``random.Random(SPLIT_SEED)`` and the last
``round(n * HELD_OUT_FRACTION)`` of that order are held out (462 of the 2,312 pairs), the rest train.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

DATA_FILE = "hh-rlhf-harmless-base-test.jsonl.gz"
SPLIT_SEED = 20261123
HELD_OUT_FRACTION = 0.2

_TURN = re.compile(r"\n\n(Human|Assistant): ")
_ROLES: dict[str, Literal["user", "assistant"]] = {"Human": "user", "Assistant": "assistant"}


class ChatMessage(TypedDict):
    """One turn of a dialogue, in the chat-template format."""

    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True)
class PreferencePair:
    """Two dialogues that share a prompt; the human labeller preferred ``chosen``."""

    chosen: list[ChatMessage]
    rejected: list[ChatMessage]


def default_data_path(repo_root: Path) -> Path:
    """The shared HH-RLHF file for a checkout at ``repo_root``: ``<repo_root>/../shared/data/<DATA_FILE>``.

    Args:
        repo_root: the rmserve checkout (the folder holding ``pyproject.toml``).

    Returns:
        The file's path (not checked for existence; ``load_pairs`` does that).
    """
    return repo_root.resolve().parent / "shared" / "data" / DATA_FILE


def dialogue_to_messages(dialogue: str) -> list[ChatMessage]:
    """Split an HH-RLHF dialogue into chat messages at its ``\\n\\nHuman: `` / ``\\n\\nAssistant: `` markers.

    Each turn's text is kept as is but for its surrounding whitespace. Turns are not merged nor
    reordered: the few dialogues with two turns of one speaker in a row keep them.

    Args:
        dialogue: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``.

    Returns:
        ``[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]``.

    Raises:
        ValueError: the text does not start with ``"\\n\\nHuman: "``.
    """
    if not dialogue.startswith("\n\nHuman: "):
        raise ValueError(
            f"an HH-RLHF dialogue starts with '\\n\\nHuman: ', this one starts with {dialogue[:40]!r}; "
            "pass the raw 'chosen' or 'rejected' text of an HH-RLHF record."
        )
    parts = _TURN.split(dialogue)[1:]  # [speaker, text, speaker, text, ...]
    return [
        ChatMessage(role=_ROLES[speaker], content=text.strip())
        for speaker, text in zip(parts[::2], parts[1::2], strict=True)
    ]


def load_pairs(path: Path) -> list[PreferencePair]:
    """Every preference pair of an HH-RLHF JSONL file (gzipped if it ends in ``.gz``), in file order.

    Args:
        path: the file, e.g. ``default_data_path(repo_root)``.

    Returns:
        One ``PreferencePair`` per line.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a line is not an HH-RLHF record (the message names the line).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; pass the path of the HH-RLHF file, which ships beside the checkout in "
            f"../shared/data/{DATA_FILE}."
        )
    opener = gzip.open if path.suffix == ".gz" else open
    pairs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                pairs.append(
                    PreferencePair(
                        dialogue_to_messages(record["chosen"]), dialogue_to_messages(record["rejected"])
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}:{number} is not an HH-RLHF record with 'chosen' and 'rejected' dialogues: {exc}"
                ) from exc
    return pairs


def split_indices(
    n: int, *, seed: int = SPLIT_SEED, held_out: float = HELD_OUT_FRACTION
) -> tuple[list[int], list[int]]:
    """The fixed train / held-out split of ``n`` pairs.

    Args:
        n: the number of pairs.
        seed: the seed of the permutation; the default is the split every report uses.
        held_out: the share of pairs held out.

    Returns:
        (train indices, held-out indices), each sorted; disjoint, together ``0..n-1``.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = n - round(n * held_out)
    return sorted(order[:cut]), sorted(order[cut:])
