"""Turn the arguments of the score methods into the server's input objects, or a ValueError.

The server accepts four input forms, one per item: ``{"prompt", "response"}``, ``{"messages"}``,
``{"text"}`` and ``{"input_ids"}``. The checks here catch what the server cannot explain well (a
bare string where a list belongs, mismatched lengths, a message without a role) and name the
offending index; everything else (roles, lengths against the model's max_length) the server checks.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

JsonInput = dict[str, Any]


def _as_list(value: object, name: str, what: str) -> list[Any]:
    """``value`` as a list, refusing a bare string or bytes (which would iterate characters)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name} must be a list of {what}, got {type(value).__name__}; wrap a single one in a list."
        )
    return list(value)


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where} must be a str, got {type(value).__name__}.")
    return value


def prompt_response_inputs(prompts: Sequence[str], responses: Sequence[str]) -> list[JsonInput]:
    """``{"prompt", "response"}`` inputs.

    Raises:
        TypeError: an argument is not a list of strings.
        ValueError: prompts and responses differ in length.
    """
    prompt_list = _as_list(prompts, "prompts", "strings")
    response_list = _as_list(responses, "responses", "strings")
    if len(prompt_list) != len(response_list):
        raise ValueError(
            f"got {len(prompt_list)} prompts and {len(response_list)} responses; pass one response per "
            "prompt (repeat a prompt for each of its responses)."
        )
    return [
        {"prompt": _string(p, f"prompts[{i}]"), "response": _string(r, f"responses[{i}]")}
        for i, (p, r) in enumerate(zip(prompt_list, response_list, strict=True))
    ]


def message(turn: object, where: str) -> dict[str, str]:
    """One chat turn as ``{"role", "content"}`` (other keys, e.g. ``name``, are dropped).

    Raises:
        TypeError: the turn is not a mapping with string role and content.
    """
    if not isinstance(turn, Mapping):
        raise TypeError(
            f'{where} must be a mapping like {{"role": "user", "content": "..."}}, got {turn!r:.80}.'
        )
    missing = [key for key in ("role", "content") if key not in turn]
    if missing:
        raise TypeError(
            f"{where} has no {' or '.join(missing)}; each turn needs a role and a string content."
        )
    return {
        "role": _string(turn["role"], f"{where}['role']"),
        "content": _string(turn["content"], f"{where}['content']"),
    }


def message_inputs(conversations: Sequence[Sequence[Mapping[str, Any]]]) -> list[JsonInput]:
    """``{"messages"}`` inputs, one per conversation.

    Raises:
        TypeError: a conversation is not a list of ``{"role", "content"}`` mappings.
        ValueError: a conversation is empty.
    """
    out: list[JsonInput] = []
    for i, conversation in enumerate(_as_list(conversations, "conversations", "message lists")):
        turns = _as_list(conversation, f"conversations[{i}]", "messages")
        if not turns:
            raise ValueError(f"conversations[{i}] is empty; a conversation needs at least one message.")
        out.append({"messages": [message(t, f"conversations[{i}][{j}]") for j, t in enumerate(turns)]})
    return out


def text_inputs(texts: Sequence[str], add_special_tokens: bool | None = None) -> list[JsonInput]:
    """``{"text"}`` inputs, with ``add_special_tokens`` when given (None: the tokenizer's default).

    Raises:
        TypeError: ``texts`` is not a list of strings.
        ValueError: a text is empty.
    """
    out: list[JsonInput] = []
    for i, text in enumerate(_as_list(texts, "texts", "strings")):
        if not _string(text, f"texts[{i}]"):
            raise ValueError(f"texts[{i}] is empty; the server scores non-empty text only.")
        out.append(
            {"text": text}
            if add_special_tokens is None
            else {"text": text, "add_special_tokens": add_special_tokens}
        )
    return out


def _plain(value: object) -> object:
    """A numpy array or torch tensor as nested lists (without importing either); anything else as is."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and not isinstance(value, Sequence):
        return tolist()
    return value


def id_inputs(token_id_lists: Sequence[Sequence[int]]) -> list[JsonInput]:
    """``{"input_ids"}`` inputs; numpy or torch integers are accepted and sent as plain ints.

    Raises:
        TypeError: an id is not an integer (floats are refused rather than rounded).
        ValueError: an id list is empty.
    """
    out: list[JsonInput] = []
    for i, ids in enumerate(_as_list(_plain(token_id_lists), "token_id_lists", "token id lists")):
        id_list = _as_list(_plain(ids), f"token_id_lists[{i}]", "ints")
        if not id_list:
            raise ValueError(f"token_id_lists[{i}] is empty; the server scores at least one token.")
        try:
            out.append({"input_ids": [operator.index(t) for t in id_list]})
        except TypeError:
            bad = next(t for t in id_list if not hasattr(t, "__index__"))
            raise TypeError(f"token_id_lists[{i}] holds {bad!r}, not an integer token id.") from None
    return out
