"""Preference pairs in TRL's JSONL conventions, read as pairs of reward inputs."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rmserve.models.inputs import Messages, PromptResponse, RewardInput, Text

SHAPES_HELP = (
    'accepted shapes: {"prompt": str, "chosen": str, "rejected": str}; '
    '{"prompt": [messages], "chosen": [messages], "rejected": [messages]}; '
    '{"chosen": [messages], "rejected": [messages]}; {"chosen": str, "rejected": str}; '
    'a message is {"role": "system"|"user"|"assistant", "content": str}'
)


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair: the labeller preferred ``chosen`` over ``rejected``.

    ``weight`` scales the pair's loss (a pair from a ranked list of k responses weighs ``1 / C(k, 2)``,
    so each list counts as much as one pair).
    """

    chosen: RewardInput
    rejected: RewardInput
    weight: float = 1.0


def _example(record: Any) -> PreferenceExample:
    """The pair of one JSON record; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise ValueError(f"missing key {missing[0]!r}")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
            return PreferenceExample(
                PromptResponse(prompt=prompt, response=chosen),
                PromptResponse(prompt=prompt, response=rejected),
            )
        if isinstance(prompt, list) and isinstance(chosen, list) and isinstance(rejected, list):
            return PreferenceExample(Messages(messages=prompt + chosen), Messages(messages=prompt + rejected))
        kinds = f"prompt {type(prompt).__name__}, chosen {type(chosen).__name__}, rejected {type(rejected).__name__}"
        raise ValueError(f"prompt, chosen and rejected must be all strings or all message lists, got {kinds}")
    if isinstance(chosen, str) and isinstance(rejected, str):
        return PreferenceExample(Text(text=chosen), Text(text=rejected))
    if isinstance(chosen, list) and isinstance(rejected, list):
        return PreferenceExample(Messages(messages=chosen), Messages(messages=rejected))
    kinds = f"chosen {type(chosen).__name__}, rejected {type(rejected).__name__}"
    raise ValueError(f"chosen and rejected must be both strings or both message lists, got {kinds}")


def response_input(prompt: Any, response: Any) -> RewardInput:
    """The scored input of one response, in the pairs' conventions (``prompt`` None: the response alone).

    Raises:
        ValueError: the prompt and response shapes do not go together.
    """
    if prompt is None:
        if isinstance(response, str):
            return Text(text=response)
        if isinstance(response, list):
            return Messages(messages=response)
    elif isinstance(prompt, str) and isinstance(response, str):
        return PromptResponse(prompt=prompt, response=response)
    elif isinstance(prompt, list) and isinstance(response, list):
        return Messages(messages=prompt + response)
    kinds = f"prompt {type(prompt).__name__}, response {type(response).__name__}"
    raise ValueError(f"a prompt and its responses must be all strings or all message lists, got {kinds}")


def read_preference_pairs(path: Path) -> list[PreferenceExample]:
    """Every preference pair of a JSONL file (gzipped if it ends in ``.gz``), in file order.

    One JSON object a line, in TRL's preference conventions (extra keys are ignored, blank lines
    skipped):

    - ``{"prompt": str, "chosen": str, "rejected": str}``: two ``PromptResponse`` inputs;
    - ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``: ``Messages`` of the
      prompt turns followed by the chosen (rejected) turns;
    - ``{"chosen": [messages], "rejected": [messages]}`` (implicit prompt): two whole ``Messages``;
    - ``{"chosen": str, "rejected": str}``: two ``Text`` inputs, already formatted.

    Args:
        path: the JSONL(.gz) file.

    Returns:
        One ``PreferenceExample`` per non-blank line.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a line is malformed (the message names the file, the line and the accepted
            shapes), or the file holds no pair.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass a JSONL(.gz) file of preference pairs.")
    opener = gzip.open if path.suffix == ".gz" else open
    examples = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                examples.append(_example(json.loads(line)))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise ValueError(
                    f"{path}:{number}: invalid {where}: {first['msg']}; {SHAPES_HELP}."
                ) from None
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{number}: {exc}; {SHAPES_HELP}.") from None
    if not examples:
        raise ValueError(f"{path} holds no preference pair; write one JSON object a line ({SHAPES_HELP}).")
    return examples
