"""Which token a decoder reward model scores: the pooling rule of a served model.

- ``hf`` (default): exactly what ``AutoModelForSequenceClassification`` computes for the checkpoint, on the
  unpadded sequence: the rightmost token that is not the config's ``pad_token_id`` (position 0 if every
  token is the pad); with no ``pad_token_id`` in the config, the last token (transformers' rule for one
  sequence). When the pad token is also EOS and a text ends with EOS (Llama-3 and SmolLM-style reward
  models trained with TRL, which sets pad = eos), this is the token before the trailing EOS.
- ``last``: the final token, whatever it is: OpenRLHF's and vLLM's convention, for models trained that way.

A model's rule is, highest priority first: the YAML ``models:`` entry's ``pooling``, the server-wide
``--pooling``, the ``pooling`` its folder's ``rmserve.json`` declares, then ``hf``. Encoder models
(BERT-like, CLS pooling inside the model) only take ``hf``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, ValidationError

from rmserve.models.descriptor import DESCRIPTOR
from rmserve.names import DEFAULT_POOLING, Pooling

POOLINGS: tuple[Pooling, ...] = ("hf", "last")

log = logging.getLogger(__name__)


class _DeclaredPooling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    pooling: Pooling | None = None


def declared_pooling(folder: Path) -> Pooling | None:
    """The ``pooling`` a model folder's ``rmserve.json`` declares (None: no file, or no such field).

    Raises:
        ValueError: the declared value is not a known rule.
    """
    file = folder / DESCRIPTOR
    if not file.is_file():
        return None
    try:
        return _DeclaredPooling.model_validate_json(file.read_bytes()).pooling
    except ValidationError as exc:
        raise ValueError(f"{file}: 'pooling' must be one of {', '.join(POOLINGS)}: {exc}") from None


def resolve_pooling(requested: Pooling | None, folder: Path) -> Pooling:
    """The rule a model is served with: ``requested`` if given, else the folder's declaration, else ``hf``."""
    return requested or declared_pooling(folder) or DEFAULT_POOLING


def config_pad_token_id(config: Any) -> int | None:
    """The pad id transformers' classifier compares against: the text config's ``pad_token_id``."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    pad = getattr(text_config, "pad_token_id", None)
    return pad if isinstance(pad, int) else None


@dataclass(frozen=True)
class PoolingRule:
    """A decoder's scored-token rule, bound to its checkpoint's pad id.

    Attributes:
        name: ``hf`` or ``last``.
        pad_token_id: the checkpoint config's pad id (read by ``hf``; None: ``hf`` scores the last token).
    """

    name: Pooling
    pad_token_id: int | None

    def positions(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The scored position of each sequence of a right-padded batch, (B,) int64.

        Args:
            ids: token ids, (B, T), each row's first ``lengths[b]`` tokens real, any padding after.
            lengths: real tokens per row, (B,), each at least 1.
        """
        if self.name == "last" or self.pad_token_id is None:
            return lengths.long() - 1  # (B,)
        index = torch.arange(ids.shape[1], device=ids.device)  # (T,)
        real = (ids != self.pad_token_id) & (index[None, :] < lengths[:, None])  # (B, T)
        return (index[None, :] * real).argmax(dim=-1)  # (B,): 0 when every token is the pad, as transformers


def pooling_rule(name: Pooling, config: Any) -> PoolingRule:
    """The rule ``name`` for a checkpoint whose (transformers) config is ``config``."""
    return PoolingRule(name, config_pad_token_id(config))


def log_pooling(model_name: str, rule: PoolingRule, tokenizer: Any) -> None:
    """Say at load which token is scored; when pad == EOS and the chat template ends with EOS, what each rule reads.

    That case is where the two rules differ on every chat input, so the load log names both.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if rule.pad_token_id is None or rule.pad_token_id != eos or not _template_ends_with(tokenizer, eos):
        log.info("%s: pooling %s", model_name, rule.name)
        return
    token = tokenizer.convert_ids_to_tokens(eos)
    hf_reads = f"the last token that is not {token} (the one before the template's closing {token})"
    last_reads = f"the final token ({token} itself)"
    used, other = (hf_reads, last_reads) if rule.name == "hf" else (last_reads, hf_reads)
    log.info(
        "%s: pad == eos == %s and the chat template ends with it; pooling %s scores %s; pooling %s would score %s",
        model_name,
        token,
        rule.name,
        used,
        "last" if rule.name == "hf" else "hf",
        other,
    )


def _template_ends_with(tokenizer: Any, token_id: int) -> bool:
    """Whether the tokenizer's chat template ends a user/assistant exchange with ``token_id``."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        ids = tokenizer.apply_chat_template(turns, tokenize=True)
    except (TemplateError, ValueError, TypeError, KeyError):  # a template that cannot render a plain
        return False  # user/assistant exchange says nothing about how one ends
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return bool(ids) and int(ids[-1]) == token_id


def write_dense_descriptor(folder: Path, pooling: Pooling) -> Path:
    """Declare the pooling rule of a plain dense checkpoint folder in its ``rmserve.json`` (kind ``dense``).

    Transformers ignores the file; rmserve serves the folder with the declared rule.
    """
    file = folder / DESCRIPTOR
    file.write_text(json.dumps({"kind": "dense", "pooling": pooling}, indent=2) + "\n")
    return file
