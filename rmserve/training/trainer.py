"""``rmserve train``: Bradley-Terry training of dense and ``moe`` reward models on preference pairs.

Loss per batch of B pairs: ``-log sigmoid(r_chosen - r_rejected)`` (mean), plus optionally

- the BSR regulariser ``bsr * mean(r)^2`` over the batch's 2B rewards (BSR paper eq. 25, default
  1e-3), which keeps the reward scale centred;
- a load-balancing loss for MoE routers (Switch-Transformer form, per MoE layer:
  ``(N - 1) * sum_i f_i * P_i``, f_i the share of routed slots sent to normal expert i and P_i its
  mean router probability), weighted by ``aux``.

Which parameters train: ``all``; ``experts`` (the MoE layers' experts and routers, the final norm and
the score head); ``head`` (the score head only). When every layer below some layer L stays frozen,
the hidden states entering L are computed once per sequence and cached, and each step runs only
layers L.. (``models.moe.frozen_prefix``): on a CPU this is what makes training a few upcycled
top layers of a 135M model take minutes rather than hours.

Inputs are encoded by the served model's own encoder (chat template, left truncation), so the
trained model scores exactly what it was trained on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from rmserve.models.decoder import base_of, embeddings_of, pad_token_id, score_head_of
from rmserve.models.inputs import InputEncoder
from rmserve.models.loader import folder_kind
from rmserve.models.moe import MoeConfig, decoder_layers, load_moe_classifier, moe_layers, read_moe_config
from rmserve.models.pooling import write_dense_descriptor
from rmserve.names import Pooling
from rmserve.training.fitting import binomial_interval
from rmserve.training.pairs import PreferenceExample
from rmserve.training.prefix import final_norm, frozen_prefix, prefix_states
from rmserve.training.upcycle import save_moe

Trainable = Literal["all", "experts", "head"]


@dataclass
class TrainOptions:
    """Hyperparameters of ``train``."""

    trainable: Trainable = "experts"
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 8
    bsr: float = 1e-3
    aux: float = 1e-2
    max_length: int = 512
    seed: int = 0


class PairData:
    """Encoded pairs of one model, with the cached prefix states when a frozen prefix is used."""

    def __init__(self, ids: list[tuple[list[int], list[int]]]) -> None:
        self.ids = ids
        self.prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def load_classifier(path: Path) -> tuple[PreTrainedModel, MoeConfig | None]:
    """A dense or ``moe`` folder's classifier in float32, and its MoE config if any."""
    if folder_kind(path) == "moe":
        return load_moe_classifier(path, torch.float32), read_moe_config(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model folder (no config.json); pass a dense or moe reward model.")
    return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32), None


def encoder_for(path: Path, model: nn.Module, max_length: int) -> InputEncoder:
    tokenizer = AutoTokenizer.from_pretrained(path)
    return InputEncoder(
        tokenizer,
        max_length=max_length,
        vocab_size=embeddings_of(model).num_embeddings,
        text_pairs=False,
    )


def encode_pairs(encoder: InputEncoder, pairs: Sequence[PreferenceExample]) -> PairData:
    ids = []
    for pair in pairs:
        chosen, rejected = encoder.encode_many([pair.chosen, pair.rejected], "left")
        ids.append((list(chosen.token_ids), list(rejected.token_ids)))
    return PairData(ids)


def select_trainable(model: nn.Module, trainable: Trainable) -> int:
    """Freeze all but the chosen parameters; return the first decoder layer that trains (or the layer count)."""
    layers = decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(trainable == "all")
    score_head_of(model).requires_grad_(True)
    if trainable == "all":
        return 0
    base = base_of(model)
    if trainable == "experts":
        moes = moe_layers(model)
        if not moes:
            raise ValueError(
                "--train experts needs a moe model (rmserve upcycle); use all or head for a dense one."
            )
        for moe in moes:
            moe.requires_grad_(True)
        final_norm(base).requires_grad_(True)
        return min(i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters()))
    return len(layers)


def _pad(rows: Sequence[torch.Tensor], value: float | int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])  # (B,)
    shape = (len(rows), int(lengths.max()), *rows[0].shape[1:])
    out = torch.full(shape, value, dtype=rows[0].dtype)  # (B, T, ...)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, lengths


def rewards(
    model: nn.Module, data: PairData, indices: Sequence[int], first_layer: int, pad_id: int
) -> torch.Tensor:
    """Rewards of the chosen and rejected sides of pairs ``indices``: (2B,), chosen first."""
    base = base_of(model)
    head = score_head_of(model)
    if data.prefix is not None:
        rows = [data.prefix[i][0] for i in indices] + [data.prefix[i][1] for i in indices]
        states, lengths = _pad(rows, 0.0)  # (2B, T, H): padding sits right of every real token, never read
        with frozen_prefix(model, first_layer):
            hidden = base(inputs_embeds=states, use_cache=False).last_hidden_state  # (2B, T, H)
    else:
        rows = [torch.tensor(data.ids[i][0]) for i in indices] + [
            torch.tensor(data.ids[i][1]) for i in indices
        ]
        ids, lengths = _pad(rows, pad_id)  # (2B, T)
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state  # (2B, T, H)
    last = hidden[torch.arange(len(rows)), lengths - 1]  # (2B, H)
    return head(last)[:, 0].float()  # (2B,)


TRAINED_POOLING: Pooling = "last"
"""The token ``rewards`` reads (each sequence's final one); trained folders declare it in ``rmserve.json``."""

PrefixMemo = dict[tuple[int, tuple[int, ...]], torch.Tensor]
"""Prefix states by (first layer, token ids): shared by runs on models with the same frozen prefix."""


def cache_prefix(
    model: nn.Module, data: PairData, first_layer: int, progress: bool, memo: PrefixMemo | None = None
) -> None:
    """Compute the hidden states entering ``first_layer`` for every sequence, once.

    Args:
        memo: states computed earlier for models whose layers below ``first_layer`` are the same.
    """
    if first_layer == 0:
        data.prefix = None
        return
    memo = {} if memo is None else memo

    def states(ids: list[int]) -> torch.Tensor:
        key = (first_layer, tuple(ids))
        if key not in memo:
            memo[key] = prefix_states(model, torch.tensor([ids]), first_layer)[0]  # (T, H)
        return memo[key]

    bar = tqdm(data.ids, desc=f"caching layers 0..{first_layer - 1}", disable=not progress)
    data.prefix = [(states(chosen), states(rejected)) for chosen, rejected in bar]


def pair_loss(rewards_2b: torch.Tensor, bsr: float) -> torch.Tensor:
    """Bradley-Terry loss of B pairs (rewards (2B,), chosen first) plus ``bsr * mean(rewards)^2``."""
    pairs = rewards_2b.shape[0] // 2
    margin = rewards_2b[:pairs] - rewards_2b[pairs:]  # (B,)
    return -F.logsigmoid(margin).mean() + bsr * rewards_2b.mean() ** 2


def balance_loss(model: nn.Module) -> torch.Tensor:
    """Switch-style load balancing over the MoE layers of the latest forward (0 without MoE layers)."""
    total = torch.zeros(())
    for moe in moe_layers(model):
        if moe.last_router_probs is None or moe.last_expert_index is None:
            continue
        experts = moe.last_router_probs.shape[-1]
        counts = torch.bincount(moe.last_expert_index.reshape(-1), minlength=experts).float()  # (N-1,)
        share = counts / counts.sum()
        total = total + experts * (share * moe.last_router_probs.mean(dim=0)).sum()
    return total


@torch.no_grad()
def accuracy(model: nn.Module, data: PairData, first_layer: int, pad_id: int, batch_size: int) -> float:
    """Pairwise accuracy: chosen reward strictly above rejected."""
    model.eval()
    wins = 0
    for start in range(0, len(data), batch_size):
        indices = list(range(start, min(start + batch_size, len(data))))
        r = rewards(model, data, indices, first_layer, pad_id)
        wins += int((r[: len(indices)] > r[len(indices) :]).sum())
    return wins / len(data)


def train(
    model_dir: Path,
    train_pairs: Sequence[PreferenceExample],
    eval_pairs: Sequence[PreferenceExample],
    out: Path,
    options: TrainOptions,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    memo: PrefixMemo | None = None,
) -> dict[str, Any]:
    """Train a dense or moe reward model; report held-out accuracy per epoch; write checkpoints and ``out``.

    ``memo`` shares cached prefix states with other runs on the same frozen layers.
    """
    torch.manual_seed(options.seed)
    model, moe_config = load_classifier(model_dir)
    first_layer = select_trainable(model, options.trainable)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    echo(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
         f"{trained / 1e6:.2f}M trained ({options.trainable}); layers below {first_layer} frozen and cached")  # fmt: skip
    encoder = encoder_for(model_dir, model, options.max_length)
    pad_id = pad_token_id(encoder.tokenizer, model.config)
    train_data, eval_data = encode_pairs(encoder, train_pairs), encode_pairs(encoder, eval_pairs)
    started = time.monotonic()
    cache_prefix(model, train_data, first_layer, progress, memo)
    cache_prefix(model, eval_data, first_layer, progress, memo)
    history = [
        {"epoch": 0, "held_out_accuracy": accuracy(model, eval_data, first_layer, pad_id, options.batch_size)}
    ]
    echo(f"epoch 0: held-out accuracy {history[0]['held_out_accuracy']:.4f} ({len(eval_data)} pairs)")
    optimiser = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=options.lr, weight_decay=0.0
    )
    generator = torch.Generator().manual_seed(options.seed)
    for epoch in range(1, options.epochs + 1):
        model.train()
        order = torch.randperm(len(train_data), generator=generator).tolist()
        steps = math.ceil(len(order) / options.batch_size)
        bar = tqdm(range(steps), desc=f"epoch {epoch}", disable=not progress)
        for step in bar:
            indices = order[step * options.batch_size : (step + 1) * options.batch_size]
            r = rewards(model, train_data, indices, first_layer, pad_id)  # (2B,)
            loss = pair_loss(r, options.bsr) + options.aux * balance_loss(model)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        held = accuracy(model, eval_data, first_layer, pad_id, options.batch_size)
        history.append({"epoch": epoch, "held_out_accuracy": held})
        echo(f"epoch {epoch}: held-out accuracy {held:.4f}")
        _save(
            model, encoder, moe_config, out / f"checkpoint-epoch-{epoch}", options, history, len(train_pairs)
        )
    interval = binomial_interval(round(history[-1]["held_out_accuracy"] * len(eval_data)), len(eval_data))
    record = {
        "data_pairs": len(train_pairs),
        "held_out_pairs": len(eval_pairs),
        "history": history,
        "held_out_standard_error": round(interval.standard_error, 4),
        "seconds": round(time.monotonic() - started, 1),
        "options": options.__dict__,
        "trained_parameters": trained,
    }
    _save(model, encoder, moe_config, out, options, history, len(train_pairs), record)
    echo(f"wrote {out} in {record['seconds']:.0f}s")
    return record


def _save(
    model: PreTrainedModel, encoder: InputEncoder, moe_config: MoeConfig | None, out: Path, options: TrainOptions,
    history: list[dict[str, Any]], pairs: int, record: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    model.eval()
    if moe_config is None:
        model.save_pretrained(out)
        encoder.tokenizer.save_pretrained(out)
        write_dense_descriptor(out, TRAINED_POOLING)
        return
    training = record or {"history": history, "data_pairs": pairs, "options": options.__dict__}
    update = {"training": training, "pooling": TRAINED_POOLING}
    save_moe(model, encoder.tokenizer, out, moe_config.model_copy(update=update))
