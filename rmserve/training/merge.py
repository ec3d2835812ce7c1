"""``rmserve merge``: learnable merging of a ``moe`` model back into a plain dense reward model.

For every MoE layer and every projection of its FFN (gate, up and down for SwiGLU FFNs;
``dense_h_to_4h`` and ``dense_4h_to_h`` with their biases for GPT-NeoX), UMM-RM eq. 8-9:

    W = lambda * W_shared + sum_i alpha_i * W_i,   alpha = softmax(logits) * (1 - lambda)

with ``lambda`` the shared-expert rate. Each projection has its own logits (one per normal expert),
so gate, up and down merge separately. Without data the logits are 0 (alpha uniform); with
preference pairs they are learned by Bradley-Terry loss with everything else frozen (the hidden
states below the first MoE layer are cached, as ``rmserve train`` does).

The output is the original dense architecture (``config.json`` of the dense model, its tokenizer,
safetensors weights): vanilla ``AutoModelForSequenceClassification.from_pretrained`` loads it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm import tqdm
from transformers import AutoTokenizer

from rmserve.models.decoder import pad_token_id
from rmserve.models.moe import UpcycledMoE, decoder_layers, load_moe_classifier, read_moe_config
from rmserve.models.pooling import write_dense_descriptor
from rmserve.training.pairs import PreferenceExample
from rmserve.training.record import data_record, write_record
from rmserve.training.trainer import (
    TRAINED_POOLING,
    PrefixMemo,
    accuracy,
    cache_prefix,
    encode_pairs,
    encoder_for,
    rewards,
)


def _projections(ffn: nn.Module) -> dict[str, list[str]]:
    """Parameter names of the FFN grouped by projection (a projection's weight and bias merge together)."""
    groups: dict[str, list[str]] = {}
    for name, _ in ffn.named_parameters():
        groups.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return groups


def _moe_at(layers: nn.ModuleList, index: int) -> UpcycledMoE:
    ffn = getattr(layers[index], "mlp", None)
    if not isinstance(ffn, UpcycledMoE):
        raise ValueError(f"layer {index} has no MoE FFN, but the folder's rmserve.json lists it as one.")
    return ffn


class MergedFFN(nn.Module):
    """The merged FFN of one MoE layer as a function of learnable alpha logits (experts frozen)."""

    def __init__(self, moe: UpcycledMoE, shared_rate: float) -> None:
        super().__init__()
        self.moe = moe
        self.shared_rate = shared_rate
        self.groups = _projections(moe.shared)
        self.logits = nn.ParameterDict(
            {g.replace(".", "_"): nn.Parameter(torch.zeros(len(moe.experts))) for g in self.groups}
        )

    def alphas(self) -> dict[str, torch.Tensor]:
        """alpha per projection: (N-1,) each, summing to 1 - shared_rate."""
        return {
            g: torch.softmax(self.logits[g.replace(".", "_")], dim=0) * (1 - self.shared_rate)
            for g in self.groups
        }

    def merged(self) -> dict[str, torch.Tensor]:
        """The merged FFN parameters, by name."""
        shared = dict(self.moe.shared.named_parameters())
        experts = [dict(e.named_parameters()) for e in self.moe.experts]
        out = {}
        for group, names in self.groups.items():
            alpha = self.alphas()[group]  # (N-1,)
            for name in names:
                stacked = torch.stack([e[name] for e in experts])  # (N-1, *shape)
                weights = alpha.view(-1, *([1] * (stacked.ndim - 1)))
                out[name] = self.shared_rate * shared[name] + (weights * stacked).sum(dim=0)
        return out

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return functional_call(self.moe.shared, self.merged(), (hidden,))


def merge(
    moe_dir: Path,
    out: Path,
    *,
    shared_rate: float,
    train_pairs: Sequence[PreferenceExample] = (),
    eval_pairs: Sequence[PreferenceExample] = (),
    epochs: int = 1,
    lr: float = 0.05,
    batch_size: int = 8,
    max_length: int = 512,
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    memo: PrefixMemo | None = None,
    data_source: str = "",
) -> dict[str, Any]:
    """Merge ``moe_dir`` into a dense folder ``out`` (learning alpha on ``train_pairs`` if given).

    ``out`` also gets the training record (``training.json``).

    ``memo`` shares cached prefix states with runs on the same frozen layers (e.g. ``rmserve train``).

    Raises:
        ValueError: the shared rate is outside [0, 1) or the folder is not a moe model.
    """
    if not 0 <= shared_rate < 1:
        raise ValueError(
            f"--shared-rate must lie in [0, 1): lambda = 1 would drop every normal expert; got {shared_rate}."
        )
    torch.manual_seed(seed)
    config = read_moe_config(moe_dir)
    model = load_moe_classifier(moe_dir, torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    merged = {i: MergedFFN(_moe_at(layers, i), shared_rate) for i in config.layers}
    for i, ffn in merged.items():
        layers[i].mlp = ffn
    record: dict[str, Any] = {"shared_rate": shared_rate, "learned": bool(train_pairs)}
    started = time.monotonic()
    if train_pairs:
        encoder = encoder_for(moe_dir, model, max_length)
        pad_id = pad_token_id(encoder.tokenizer, model.config)
        first = min(config.layers)
        train_data, eval_data = encode_pairs(encoder, train_pairs), encode_pairs(encoder, eval_pairs)
        cache_prefix(model, train_data, first, progress, memo)
        cache_prefix(model, eval_data, first, progress, memo)
        params = [p for ffn in merged.values() for p in ffn.logits.parameters()]
        optimiser = torch.optim.Adam(params, lr=lr)
        generator = torch.Generator().manual_seed(seed)
        history = []
        if eval_pairs:
            history.append(
                {"epoch": 0, "held_out_accuracy": accuracy(model, eval_data, first, pad_id, batch_size)}
            )
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(train_data), generator=generator).tolist()
            steps = math.ceil(len(order) / batch_size)
            for step in tqdm(range(steps), desc=f"merge epoch {epoch}", disable=not progress):
                indices = order[step * batch_size : (step + 1) * batch_size]
                r = rewards(model, train_data, indices, first, pad_id)
                loss = -F.logsigmoid(r[: len(indices)] - r[len(indices) :]).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            if eval_pairs:
                history.append(
                    {
                        "epoch": epoch,
                        "held_out_accuracy": accuracy(model, eval_data, first, pad_id, batch_size),
                    }
                )
                echo(f"merge epoch {epoch}: held-out accuracy {history[-1]['held_out_accuracy']:.4f}")
        record["history"] = history
    with torch.no_grad():
        for i, ffn in merged.items():
            dense_ffn = ffn.moe.shared
            for name, value in ffn.merged().items():
                dense_ffn.get_parameter(name).copy_(value)
            layers[i].mlp = dense_ffn
        record["alpha"] = {
            str(i): {g: [round(a, 6) for a in v.tolist()] for g, v in ffn.alphas().items()}
            for i, ffn in merged.items()
        }
    record["seconds"] = round(time.monotonic() - started, 1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(moe_dir).save_pretrained(out)
    pooling = TRAINED_POOLING if train_pairs else config.pooling  # merging weights learned on that token
    if pooling is not None:
        write_dense_descriptor(out, pooling)
    options = {"moe": str(moe_dir), "shared_rate": shared_rate, "epochs": epochs, "lr": lr,
               "batch_size": batch_size, "max_length": max_length, "seed": seed}  # fmt: skip
    write_record(out, command="rmserve merge", data=data_record(train_pairs, eval_pairs, data_source),
                 options=options, results=record, started=started)  # fmt: skip
    echo(
        f"wrote {out}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
    )
    return record
