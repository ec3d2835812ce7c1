"""Scoring targets of ``rmserve lab bon``: which server, model, aggregate and options give a reward.

A target is written ``[LABEL=]URL[:MODEL[:AGGREGATE]][?OPTION=VALUE&...]``, for example
``http://127.0.0.1:8000``, ``dense=http://127.0.0.1:8000:dense``,
``brme-0.4-req=http://127.0.0.1:8001:brme:tradeoff?tradeoff_lambda=0.4&tradeoff_scope=request``.
``URL`` is ``http(s)://host[:port]``; an empty ``MODEL`` is the server's default model; without
``AGGREGATE`` the reward is the server's ``rewards``. Options are the request's own: ``uwo_lambda``,
``tradeoff_lambda``, ``tradeoff_scope`` (``input`` or ``request``: the request is one prompt's candidates)
and ``truncation``. Targets that share URL, model and options are scored by the same requests.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

OPTIONS = ("uwo_lambda", "tradeoff_lambda", "tradeoff_scope", "truncation")
_FLOATS = ("uwo_lambda", "tradeoff_lambda")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
FORM_HELP = "[LABEL=]URL[:MODEL[:AGGREGATE]][?OPTION=VALUE&...] (options: " + ", ".join(OPTIONS) + ")"


@dataclass(frozen=True)
class Target:
    """One reward to compute for every candidate."""

    label: str
    url: str
    model: str | None = None
    aggregate: str | None = None
    options: tuple[tuple[str, str | float], ...] = field(default_factory=tuple)

    @property
    def group(self) -> tuple[str, str | None, tuple[tuple[str, str | float], ...]]:
        """Targets with the same group share their requests."""
        return (self.url, self.model, self.options)

    @property
    def spec(self) -> str:
        """The target, written back in its own form (without the label)."""
        text = self.url + (f":{self.model or ''}" if self.model or self.aggregate else "")
        text += f":{self.aggregate}" if self.aggregate else ""
        return text + ("?" + "&".join(f"{k}={v}" for k, v in self.options) if self.options else "")

    @property
    def fingerprint(self) -> str:
        """A short hash of what is scored: model, aggregate and options, not the URL (a cached score file
        must match it; a server that moved, or restarted on another port, still resumes)."""
        what = f"{self.model or ''}:{self.aggregate or ''}?" + "&".join(f"{k}={v}" for k, v in self.options)
        return hashlib.sha256(what.encode()).hexdigest()[:12]


def parse_target(text: str, default_label: str | None = None) -> Target:
    """Parse one target (see the module docstring).

    Raises:
        ValueError: the text is not of that form (the message shows the form).
    """
    where = f"target {text!r}: "
    label = None
    if "=" in text.split("://", 1)[0]:
        label, text = text.split("=", 1)
        if not _LABEL.match(label):
            raise ValueError(where + f"a label is letters, digits and _.+- (got {label!r}).")
    body, _, query = text.partition("?")
    scheme, sep, rest = body.partition("://")
    if not sep or scheme not in ("http", "https") or not rest:
        raise ValueError(where + f"expected {FORM_HELP}, starting http:// or https://.")
    parts = rest.split(":")
    host = parts.pop(0)
    if parts and re.fullmatch(r"\d+(/.*)?", parts[0]):
        host += ":" + parts.pop(0)
    if len(parts) > 2 or not host:
        raise ValueError(where + f"expected {FORM_HELP}.")
    model = parts[0] if parts and parts[0] else None
    aggregate = parts[1] if len(parts) > 1 and parts[1] else None
    options: list[tuple[str, str | float]] = []
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False) if query else []:
        if key not in OPTIONS:
            raise ValueError(where + f"unknown option {key!r}; options are {', '.join(OPTIONS)}.")
        if key in _FLOATS:
            try:
                options.append((key, float(value)))
            except ValueError:
                raise ValueError(where + f"{key} must be a number, got {value!r}.") from None
        else:
            options.append((key, value))
    url = f"{scheme}://{host}".rstrip("/")
    name = label or default_label or "-".join(p for p in (model or "default", aggregate) if p)
    return Target(name, url, model, aggregate, tuple(sorted(options)))


def check_labels(targets: Sequence[Target]) -> None:
    """Refuse two targets with one label.

    Raises:
        ValueError: a label repeats (the message says how to name them apart).
    """
    seen: set[str] = set()
    for target in targets:
        if target.label in seen:
            raise ValueError(
                f"two targets are labelled {target.label!r}; name them apart with LABEL=URL..., e.g. "
                f"{target.label}-2={target.spec}."
            )
        seen.add(target.label)
