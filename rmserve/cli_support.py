"""What the ``rmserve`` commands share: flag help from the settings, settings from flags, logging, errors.

Commands exit 2 with ``error: ...`` on a bad argument or input (``fail``), never with a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from pydantic import ValidationError

from rmserve.config import Settings
from rmserve.logs import LogFormat

if TYPE_CHECKING:  # the training modules load torch: only the commands that train import them
    from rmserve.training.pairs import PreferenceExample


def setting_help(name: str) -> str:
    field = Settings.model_fields[name]
    default = "" if field.default is None or field.default_factory else f"default {field.default}; "
    return f"{field.description} ({default}env RMSERVE_{name.upper()})"


def load_settings(**flags: Any) -> Settings:
    """Settings from the given flags (None: not given), env vars and the YAML config; exits on error."""
    try:
        return Settings(**{k: v for k, v in flags.items() if v is not None})
    except (ValidationError, ValueError) as exc:
        typer.echo(f"error: invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    from rmserve.logs import configure_logging as configure

    configure(level, log_format)


def fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


def pairs_split(
    data: Path, eval_data: Path | None, eval_fraction: float, seed: int
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """The training pairs of ``data`` and the held-out ones: ``eval_data``, else a seeded share of ``data``."""
    from rmserve.training.pairs import read_preference_pairs
    from rmserve.training.pipeline import split_pairs

    pairs = read_preference_pairs(data)
    if eval_data is not None:
        return pairs, read_preference_pairs(eval_data)
    return split_pairs(pairs, eval_fraction, seed)
