"""``rmserve upcycle``: a dense decoder reward model into a shared-expert MoE folder (UMM-RM, kind ``moe``).

Every chosen decoder layer's FFN becomes an ``UpcycledMoE`` (``rmserve.models.moe``): the shared expert
and N - 1 normal experts, each a copy of the dense FFN, and a new router. The weights of the shared
and routed experts sum to 1, so the upcycled model scores exactly as the dense one until training
moves the experts apart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from rmserve.models.descriptor import DESCRIPTOR
from rmserve.models.moe import WEIGHTS, MoeConfig, decoder_layers, replace_ffns
from rmserve.models.pooling import declared_pooling
from rmserve_kernels.routing import RoutingRule


def resolve_layers(total: int, layers: Sequence[int] | None, last: int | None) -> tuple[int, ...]:
    """The layers to upcycle: an explicit list, the ``last`` n, or all."""
    if layers and last:
        raise ValueError("give either the layers to upcycle or how many of the last ones, not both.")
    if last is not None:
        if not 1 <= last <= total:
            raise ValueError(f"last must lie in [1, {total}], got {last}.")
        return tuple(range(total - last, total))
    chosen = tuple(sorted(set(layers))) if layers else tuple(range(total))
    bad = [i for i in chosen if not 0 <= i < total]
    if bad:
        raise ValueError(f"layer {bad[0]} does not exist; the model has layers 0..{total - 1}.")
    return chosen


def save_moe(model: PreTrainedModel, tokenizer: Any, out: Path, config: MoeConfig) -> Path:
    """Write a ``moe`` folder: dense ``config.json``, tokenizer, full state dict, ``rmserve.json``."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, out / WEIGHTS, metadata={"format": "pt"})
    (out / DESCRIPTOR).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    return out


def upcycle(
    dense: Path, out: Path, *, experts: int, top_k: int, layers: Sequence[int] | None = None,
    last: int | None = None, seed: int = 0, routing: RoutingRule = "xft",
) -> MoeConfig:  # fmt: skip
    """Upcycle a dense reward-model folder into a ``moe`` folder (every expert a copy of the FFN).

    Raises:
        ValueError: the folder is not a one-label decoder classifier, or the options are invalid.
    """
    model = AutoModelForSequenceClassification.from_pretrained(dense, dtype=torch.float32)
    if model.config.num_labels != 1:
        raise ValueError(f"{dense} has num_labels={model.config.num_labels}; a reward model has exactly one.")
    chosen = resolve_layers(len(decoder_layers(model)), layers, last)
    replace_ffns(model, chosen, experts=experts, top_k=top_k, seed=seed, rule=routing)
    config = MoeConfig(
        experts=experts,
        top_k=top_k,
        routing=routing,
        layers=chosen,
        upcycled_from=str(dense.resolve()),
        pooling=declared_pooling(dense),  # it scores exactly as the dense model, on the same token
    )
    save_moe(model, AutoTokenizer.from_pretrained(dense), out, config)
    return config
