"""LoRA adapters for training, through peft: ``rmserve train --lora-rank R [--lora-targets ...] --train top:N``.

``add_lora`` wraps a dense decoder classifier in peft's ``PeftModelForSequenceClassification``: LoRA on
the named projections of the chosen decoder layers (peft's ``layers_to_transform``), the score head
trained in full through peft's ``modules_to_save``, every other weight frozen. ``save_adapter`` writes
peft's own adapter folder plus the base's config and tokenizer and the ``lora`` descriptor
(``rmserve.models.lora``), which the server loads by path; ``merge_lora`` (``rmserve merge-lora``) writes
the adapter merged into its base as a plain dense checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoTokenizer

from rmserve.models.decoder import config_of
from rmserve.models.lora import (
    load_merged_classifier,
    quiet_peft,
    read_lora_descriptor,
    write_lora_descriptor,
)
from rmserve.models.pooling import write_dense_descriptor
from rmserve.names import Pooling

DEFAULT_TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter's shape: rank r, scale alpha / r, the projections it adapts, its dropout."""

    rank: int
    alpha: int | None = None  # None: 2 * rank
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"--lora-rank must be at least 1, got {self.rank}.")
        if not self.targets or any(not t for t in self.targets):
            raise ValueError("--lora-targets needs module names, comma-separated, e.g. q_proj,v_proj.")


def lora_spec(rank: int | None, targets: str, alpha: int | None) -> LoraSpec | None:
    """The spec the ``--lora-rank``, ``--lora-targets`` (comma-separated) and ``--lora-alpha`` flags give."""
    if rank is None:
        return None
    return LoraSpec(rank=rank, alpha=alpha, targets=tuple(t.strip() for t in targets.split(",") if t.strip()))


def add_lora(model: nn.Module, spec: LoraSpec, layers: Sequence[int]) -> tuple[PeftModel, nn.Module]:
    """Wrap ``model`` for LoRA training on ``layers``; return peft's model and the classifier inside it.

    The classifier inside is ``model`` itself, its targets now LoRA layers and its ``score`` peft's
    trained copy: calling its base model and ``score`` runs the adapted model.

    Raises:
        ValueError: no module of the chosen layers matches the targets.
    """
    names = [name for name, _ in model.named_modules()]
    targeted = [
        n for n in names if n.rsplit(".", 1)[-1] in spec.targets and any(f".layers.{i}." in n for i in layers)
    ]
    if not targeted:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if ".layers." in n})
        raise ValueError(
            f"--lora-targets {','.join(spec.targets)} matches no module of layers {list(layers)}; the decoder "
            f"layers' modules are named {', '.join(leaves)}."
        )
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha if spec.alpha is not None else 2 * spec.rank,
        lora_dropout=spec.dropout,
        target_modules=list(spec.targets),
        layers_to_transform=list(layers),
        modules_to_save=["score"],
        task_type="SEQ_CLS",
    )
    with quiet_peft():
        peft_model = get_peft_model(model, config)
    return peft_model, _inner(peft_model)


def _inner(peft_model: PeftModel) -> nn.Module:
    inner = peft_model.base_model.model
    if not isinstance(inner, nn.Module):
        raise TypeError(f"peft wrapped a {type(inner).__name__}, not a module.")
    return inner


def save_adapter(peft_model: PeftModel, base: Path, tokenizer: Any, out: Path, pooling: Pooling) -> None:
    """Write ``out``: peft's adapter files, the base's config and tokenizer, and the ``lora`` descriptor."""
    out.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].base_model_name_or_path = str(base.resolve())
    peft_model.save_pretrained(str(out))
    config_of(_inner(peft_model)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_lora_descriptor(out, base, pooling)


def merge_lora(adapter: Path, out: Path) -> None:
    """Write ``out``: the adapter merged into its base (float32), tokenizer, and the declared pooling.

    Raises:
        ValueError: ``adapter`` is not a lora folder, or its base is gone.
    """
    descriptor = read_lora_descriptor(adapter)
    model = load_merged_classifier(adapter, torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
    write_dense_descriptor(out, descriptor.pooling or "hf")
