"""LoRA reward models (kind ``lora``): a peft adapter on a dense base, merged into the base when loaded.

A ``lora`` folder is peft's own adapter format, so ``PeftModel.from_pretrained(
AutoModelForSequenceClassification.from_pretrained(base), folder)`` loads it: ``adapter_config.json`` and
``adapter_model.safetensors`` (the LoRA matrices, and the trained score head through peft's
``modules_to_save``). Beside them: the base's ``config.json`` and tokenizer, so the folder describes its
architecture and tokenisation, and ``rmserve.json``::

    {"kind": "lora", "base": "/abs/path/to/the/dense/base", "pooling": "last"}

Served merged: the adapter is folded into the base weights at load (``W + B A * alpha / r``, peft's
``merge_and_unload``), so the forward is a plain dense forward: no extra matmuls per adapted layer, and
the kernels, quantisation and memory planning of dense models apply unchanged. The cost is float
rounding: in float32 the merged model equals peft's unmerged forward to 1e-4
(``tests/models/test_lora_models.py``); in bfloat16 the merged weights are rounded once, as any bfloat16
checkpoint is. ``rmserve merge-lora`` writes the merged model as a plain checkpoint.

peft is imported only when an adapter is loaded (importing it costs about three seconds).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from rmserve.models.decoder import config_of
from rmserve.models.dense import DenseRewardModel
from rmserve.models.descriptor import DESCRIPTOR, read_descriptor
from rmserve.models.quantize import head_modules, quantize_linears
from rmserve.names import Pooling

ADAPTER_CONFIG = "adapter_config.json"


class LoraDescriptor(BaseModel):
    """``rmserve.json`` of a ``lora`` folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["lora"] = "lora"
    base: str = Field(description="The dense base model folder the adapter applies to (absolute path).")
    pooling: Pooling | None = Field(None, description="The token the score head reads; unset: hf.")


def read_lora_descriptor(path: Path) -> LoraDescriptor:
    """The folder's descriptor, checked: the adapter files and the base folder exist.

    Raises:
        ValueError: a file is missing or the base folder is gone.
    """
    descriptor = read_descriptor(path, LoraDescriptor, "lora", "train one with rmserve train --lora-rank")
    if not (path / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{path} has no {ADAPTER_CONFIG}; a lora folder holds a peft adapter (rmserve train --lora-rank).")  # fmt: skip
    if not (Path(descriptor.base) / "config.json").is_file():
        raise ValueError(
            f"{path / DESCRIPTOR} names base {descriptor.base}, which is not a model folder (no config.json); "
            "put the base model back there, or edit 'base' to where it now is."
        )
    return descriptor


def write_lora_descriptor(path: Path, base: Path, pooling: Pooling) -> None:
    """Write the folder's ``rmserve.json``."""
    descriptor = LoraDescriptor(base=str(base.resolve()), pooling=pooling)
    (path / DESCRIPTOR).write_text(json.dumps(descriptor.model_dump(mode="json"), indent=2) + "\n")


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Hide the one warning peft 0.21 raises under transformers 5 (a renamed attribute it reads; harmless)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def load_adapted(path: Path, dtype: torch.dtype = torch.float32, base: Path | None = None) -> Any:
    """The base classifier with the folder's adapter applied, unmerged: peft's own ``PeftModel``.

    Args:
        base: the base folder, for adapter folders without a ``lora`` descriptor (a branched model's
            branches); None: the descriptor's.
    """
    from peft import PeftModel

    base = base if base is not None else Path(read_lora_descriptor(path).base)
    classifier = AutoModelForSequenceClassification.from_pretrained(base, dtype=dtype)
    with quiet_peft():
        return PeftModel.from_pretrained(classifier, path).eval()


def load_merged_classifier(
    path: Path, dtype: torch.dtype = torch.float32, base: Path | None = None
) -> PreTrainedModel:
    """The base classifier with the folder's adapter merged into its weights (a plain transformers model)."""
    merged = load_adapted(path, torch.float32, base).merge_and_unload()  # merged in float32, then cast once
    if not isinstance(merged, PreTrainedModel):
        raise TypeError(f"merging {path} gave a {type(merged).__name__}, not a transformers model.")
    module: nn.Module = merged
    module.to(dtype)  # in place
    return merged.eval()


class LoraRewardModel(DenseRewardModel):
    """A ``lora`` folder served as its merged dense model (see the module docstring for why merged)."""

    kind = "lora"

    def _load_classifier(self, path: Path, config: PretrainedConfig) -> nn.Module:
        model: nn.Module = load_merged_classifier(path, self.dtype)
        if self.quantize == "none":
            return model
        model.to(self.device)
        quantize_linears(
            model, self.quantize, dtype=self.dtype, device=self.device, keep=head_modules(config_of(model))
        )
        return model
