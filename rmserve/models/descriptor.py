"""``rmserve.json``: the descriptor that says what a non-dense model folder holds, and its reading."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

DESCRIPTOR = "rmserve.json"
Schema = TypeVar("Schema", bound=BaseModel)


def read_descriptor(path: Path, schema: type[Schema], what: str, create_hint: str) -> Schema:
    """Parse ``path / rmserve.json`` as ``schema``.

    Args:
        path: the model folder.
        schema: the descriptor's pydantic model.
        what: the kind of folder, for messages (e.g. ``ensemble``).
        create_hint: how to make such a folder, for the missing-file message.

    Raises:
        ValueError: the file is missing or invalid (the message says which field).
    """
    file = path / DESCRIPTOR
    try:
        return schema.model_validate_json(file.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"{path} has no {DESCRIPTOR}; {create_hint}.") from None
    except ValidationError as exc:
        raise ValueError(f"{file} is not a valid {what} descriptor: {exc}") from None
