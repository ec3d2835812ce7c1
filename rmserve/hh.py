"""HH-RLHF preference data: dialogues as chat messages, pairs, and the fixed held-out split.

The shared file holds Anthropic's HH-RLHF harmless-base test split (MIT licence): one JSON object a line
with ``chosen`` and ``rejected`` full dialogues ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

DATA_FILE = "hh-rlhf-harmless-base-test.jsonl.gz"
SPLIT_SEED = 20261123
HELD_OUT_FRACTION = 0.2

_TURN = re.compile(r"\n\n(Human|Assistant): ")
_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class PreferencePair:
    """Two dialogues that share a prompt; humans preferred ``chosen``."""

    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]


def default_data_path(repo_root: Path) -> Path:
    """Where the shared HH-RLHF file lies for a checkout at ``repo_root`` (``<repo>/../shared/data``)."""
    return repo_root.resolve().parent / "shared" / "data" / DATA_FILE


def dialogue_to_messages(dialogue: str) -> list[dict[str, str]]:
    """Split an HH-RLHF dialogue into chat messages (user/assistant turns, whitespace-trimmed).

    Raises:
        ValueError: the text does not start with a Human turn.
    """
    if not dialogue.startswith("\n\nHuman: "):
        raise ValueError(f"an HH-RLHF dialogue starts with '\\n\\nHuman: ', got {dialogue[:40]!r}")
    parts = _TURN.split(dialogue)[1:]  # [role, text, role, text, ...]
    return [
        {"role": _ROLES[role], "content": text.strip()}
        for role, text in zip(parts[::2], parts[1::2], strict=True)
    ]


def load_pairs(path: Path) -> list[PreferencePair]:
    """Every preference pair of an HH-RLHF JSONL(.gz) file, in file order.

    Raises:
        FileNotFoundError: the file is missing (the message says where it is expected).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; pass the HH-RLHF file's path (it ships in ../shared/data/)."
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        PreferencePair(dialogue_to_messages(r["chosen"]), dialogue_to_messages(r["rejected"])) for r in rows
    ]


def split_indices(
    n: int, seed: int = SPLIT_SEED, held_out: float = HELD_OUT_FRACTION
) -> tuple[list[int], list[int]]:
    """The fixed train / held-out split of ``n`` pairs: a seeded permutation, the last share held out.

    Returns:
        (train indices, held-out indices), each sorted.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = n - round(n * held_out)
    return sorted(order[:cut]), sorted(order[cut:])
