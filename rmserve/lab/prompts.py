"""Lab prompts: the distinct first user turns of a preference file, split into train and eval prompts.

A prompt file is JSONL, one ``{"id": str, "prompt": str}`` a line. Ids are the first 12 hex digits of the
SHA-256 of the prompt text, so they name the same prompt in every file built from it. The split is by
prompt: the distinct prompts (in first-appearance order) are shuffled with ``random.Random(seed)``; the
first ``eval_prompts`` are the evaluation prompts, the next ``train_prompts`` the proxy-training ones.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rmserve.models.inputs import Messages, PromptResponse, RewardInput, Text
from rmserve.training.hh import dialogue_to_messages
from rmserve.training.pairs import read_preference_pairs

EVAL_FILE = "eval.jsonl"
TRAIN_FILE = "train.jsonl"


@dataclass(frozen=True)
class LabPrompt:
    """One prompt: a user turn the policy answers."""

    id: str
    prompt: str


def prompt_id(prompt: str) -> str:
    """The id of a prompt text: its SHA-256, 12 hex digits."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


def first_user_turn(item: RewardInput) -> str | None:
    """The first user turn of a preference input (HH dialogues in plain text are split at their markers)."""
    if isinstance(item, PromptResponse):
        return item.prompt
    if isinstance(item, Messages):
        turns = [m.content for m in item.messages if m.role == "user"]
        return turns[0] if turns else None
    if isinstance(item, Text) and item.text.startswith("\n\nHuman: "):
        turns = [m["content"] for m in dialogue_to_messages(item.text) if m["role"] == "user"]
        return turns[0] if turns else None
    return None


def distinct_prompts(data: Path) -> list[LabPrompt]:
    """The distinct, non-empty first user turns of a preference file, in first-appearance order.

    Raises:
        FileNotFoundError: ``data`` is missing.
        ValueError: a line is malformed, or no pair has a user turn to take.
    """
    seen: dict[str, LabPrompt] = {}
    for pair in read_preference_pairs(data):
        text = first_user_turn(pair.chosen)
        if text and text.strip() and text not in seen:
            seen[text] = LabPrompt(prompt_id(text), text)
    if not seen:
        raise ValueError(
            f"{data} has no user turn to take as a prompt: pairs need a 'prompt', chat messages with a user "
            "turn, or HH-RLHF dialogues ('\\n\\nHuman: ...')."
        )
    return list(seen.values())


def split_prompts(
    prompts: Sequence[LabPrompt], eval_prompts: int, train_prompts: int, seed: int
) -> tuple[list[LabPrompt], list[LabPrompt]]:
    """(eval, train) prompts: disjoint, drawn by one seeded shuffle.

    Raises:
        ValueError: fewer prompts than asked for.
    """
    if eval_prompts < 1 or train_prompts < 0:
        raise ValueError("--eval-prompts must be at least 1 and --train-prompts at least 0.")
    if eval_prompts + train_prompts > len(prompts):
        raise ValueError(
            f"the file has {len(prompts)} distinct prompts, fewer than --eval-prompts {eval_prompts} + "
            f"--train-prompts {train_prompts}; ask for fewer."
        )
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return order[:eval_prompts], order[eval_prompts : eval_prompts + train_prompts]


def write_prompts(path: Path, prompts: Sequence[LabPrompt]) -> None:
    """Write a prompt file (JSONL)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"id": p.id, "prompt": p.prompt}, ensure_ascii=False) + "\n")


def read_prompts(path: Path) -> list[LabPrompt]:
    """Every prompt of a prompt file, in order.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a line is not ``{"id": str, "prompt": str}``, or an id repeats.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write one with `rmserve lab prompts`.")
    prompts: list[LabPrompt] = []
    ids: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not JSON: {exc}") from None
            if not (
                isinstance(record, dict)
                and isinstance(record.get("id"), str)
                and isinstance(record.get("prompt"), str)
            ):
                raise ValueError(f'{path}:{number}: expected {{"id": str, "prompt": str}}, got {line[:80]!r}')
            if record["id"] in ids:
                raise ValueError(f"{path}:{number}: id {record['id']!r} repeats; ids must be unique.")
            ids.add(record["id"])
            prompts.append(LabPrompt(record["id"], record["prompt"]))
    if not prompts:
        raise ValueError(f"{path} holds no prompt.")
    return prompts
