"""``rmserve train``: Bradley-Terry training of dense and ``moe`` reward models on preference pairs.

Loss per batch of B pairs: ``-log sigmoid(r_chosen - r_rejected)`` (mean), plus optionally

- the BSR regulariser (BSR paper), ``strength * penalty`` over the batch's 2B rewards, where
  ``penalty`` is ``mean(r)^2`` (``square-of-mean``, eq. 25, the default) or ``mean(r^2)``
  (``mean-of-squares``, whose gradient ``r / B`` per reward is the paper's eq. 28), and ``strength``
  is ``bsr`` (``bsr_scaling="none"``) or ``bsr * B`` (``"batch"``: the authors' code multiplies lambda
  by the per-device batch size, so their lambda 1e-3 on 16 pairs a device is 1.6e-2 here);
- a load-balancing loss for MoE routers (Switch-Transformer form, per MoE layer:
  ``(N - 1) * sum_i f_i * P_i``, f_i the share of routed slots sent to normal expert i and P_i its
  mean router probability), weighted by ``aux``.

Which parameters train: ``all``; ``top:N`` (the top N decoder layers, the final norm and the score
head); ``experts`` (the MoE layers' experts and routers, the final norm and the score head); ``head``
(the score head only). With a ``LoraSpec`` the chosen layers (``top:N`` or ``all``) get peft LoRA
adapters instead of full training, plus the score head (``training.lora``), and the output is a peft
adapter folder (kind ``lora``). When every layer below some layer L stays frozen, the hidden states
entering L are computed once per sequence and cached, and each step runs only layers L..
(``training.prefix.frozen_prefix``): on a CPU this is what makes training a few top layers of a
135M model take minutes rather than hours.

Inputs are encoded by the served model's own encoder (chat template, left truncation), so the
trained model scores exactly what it was trained on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from rmserve.models.decoder import base_of, config_of, embeddings_of, pad_token_id, score_head_of
from rmserve.models.inputs import InputEncoder
from rmserve.models.loader import folder_kind
from rmserve.models.moe import MoeConfig, decoder_layers, load_moe_classifier, moe_layers, read_moe_config
from rmserve.models.pooling import write_dense_descriptor
from rmserve.names import TRAINABLE_HELP, Pooling
from rmserve.training.fitting import binomial_interval
from rmserve.training.lora import LoraSpec, add_lora, save_adapter
from rmserve.training.pairs import PreferenceExample
from rmserve.training.prefix import final_norm, frozen_prefix, prefix_states
from rmserve.training.record import data_record, plain, write_record
from rmserve.training.upcycle import save_moe

BsrForm = Literal["square-of-mean", "mean-of-squares"]
BsrScaling = Literal["none", "batch"]
BSR_FORMS: tuple[BsrForm, ...] = get_args(BsrForm)
BSR_SCALINGS: tuple[BsrScaling, ...] = get_args(BsrScaling)


@dataclass
class TrainOptions:
    """Hyperparameters of ``train``.

    ``trainable``: ``all``, ``top:N``, ``experts`` or ``head`` (see the module docstring).
    """

    trainable: str = "experts"
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 8
    bsr: float = 1e-3
    bsr_form: BsrForm = "square-of-mean"
    bsr_scaling: BsrScaling = "none"
    aux: float = 1e-2
    max_length: int = 512
    seed: int = 0
    lora: LoraSpec | None = field(default=None)

    def __post_init__(self) -> None:
        if self.bsr_form not in BSR_FORMS:
            raise ValueError(f"bsr form must be one of {', '.join(BSR_FORMS)}, got {self.bsr_form!r}.")
        if self.bsr_scaling not in BSR_SCALINGS:
            raise ValueError(
                f"bsr scaling must be one of {', '.join(BSR_SCALINGS)}, got {self.bsr_scaling!r}."
            )
        if self.bsr < 0 or not math.isfinite(self.bsr):
            raise ValueError(f"--bsr must be a finite number >= 0, got {self.bsr}.")
        top_layers(self.trainable)  # a malformed top:N fails here, before any work

    @property
    def bsr_strength(self) -> float:
        """The weight on the BSR penalty: ``bsr``, times the pairs per step with ``bsr_scaling="batch"``."""
        return self.bsr * (self.batch_size if self.bsr_scaling == "batch" else 1)


def top_layers(trainable: str) -> int | None:
    """N of ``top:N`` (None for the other choices).

    Raises:
        ValueError: not one of all, top:N, experts, head; or N not a positive integer.
    """
    if trainable in ("all", "experts", "head"):
        return None
    kind, _, count = trainable.partition(":")
    if kind != "top" or not count.isdigit() or int(count) < 1:
        raise ValueError(f"--train must be {TRAINABLE_HELP}; got {trainable!r}.")
    return int(count)


class PairData:
    """Encoded pairs of one model and their loss weights, with the cached prefix states when a frozen
    prefix is used."""

    def __init__(self, ids: list[tuple[list[int], list[int]]], weights: list[float] | None = None) -> None:
        self.ids = ids
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(ids))  # (N,)
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
    return PairData(ids, [pair.weight for pair in pairs])


def select_trainable(model: nn.Module, trainable: str) -> int:
    """Freeze all but the chosen parameters; return the first decoder layer that trains (or the layer count).

    Raises:
        ValueError: ``top:N`` with N above the layer count, or ``experts`` on a model without MoE layers.
    """
    layers = decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(trainable == "all")
    score_head_of(model).requires_grad_(True)
    if trainable == "all":
        return 0
    base = base_of(model)
    top = top_layers(trainable)
    if top is not None:
        if top > len(layers):
            raise ValueError(f"--train top:{top} asks for more layers than the model's {len(layers)}.")
        for layer in layers[len(layers) - top :]:
            layer.requires_grad_(True)
        final_norm(base).requires_grad_(True)
        return len(layers) - top
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
    last = pooled_states(model, data, indices, first_layer, pad_id)  # (2B, H)
    return trained_head(model)(last)[:, 0].float()  # (2B,)


def pooled_states(
    model: nn.Module, data: PairData, indices: Sequence[int], first_layer: int, pad_id: int
) -> torch.Tensor:
    """The final hidden state at each sequence's last token, chosen sides then rejected: (2B, H)."""
    base = base_of(model)
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
    return hidden[torch.arange(len(rows)), lengths - 1]  # (2B, H)


def trained_head(model: nn.Module) -> nn.Module:
    """The module that computes the reward from the pooled state: ``score`` (under LoRA, peft's trained copy)."""
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} is not a decoder reward model with a 'score' head.")
    return head


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


def bsr_penalty(rewards_2b: torch.Tensor, form: BsrForm = "square-of-mean") -> torch.Tensor:
    """BSR's penalty on a batch's rewards (2B,): ``mean(r)^2`` (eq. 25) or ``mean(r^2)`` (eq. 28's)."""
    if form == "square-of-mean":
        return rewards_2b.mean() ** 2
    return rewards_2b.pow(2).mean()


def pair_loss(
    rewards_2b: torch.Tensor,
    bsr: float,
    form: BsrForm = "square-of-mean",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bradley-Terry loss of B pairs (rewards (2B,), chosen first) plus ``bsr * bsr_penalty(rewards)``.

    With ``weights`` (B,), the Bradley-Terry term is their weighted mean (a ranked list's pairs share one
    unit of weight: DMoERM's listwise eq. 7).
    """
    pairs = rewards_2b.shape[0] // 2
    margin = rewards_2b[:pairs] - rewards_2b[pairs:]  # (B,)
    losses = -F.logsigmoid(margin)  # (B,)
    equal = weights is None or bool((weights == weights[0]).all())
    bt = losses.mean() if equal or weights is None else (losses * weights).sum() / weights.sum()
    return bt + bsr * bsr_penalty(rewards_2b, form)


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


@dataclass
class Fitted:
    """A trained model and what was measured: ``fit``'s result.

    ``model`` is the classifier (under LoRA, the one inside ``adapter``, peft's model); ``eval_data`` the
    encoded held-out pairs, prefix states cached from ``first_layer``.
    """

    model: nn.Module
    adapter: Any
    encoder: InputEncoder
    moe_config: MoeConfig | None
    first_layer: int
    pad_id: int
    eval_data: PairData
    results: dict[str, Any]


def fit(
    model_dir: Path,
    train_pairs: Sequence[PreferenceExample],
    eval_pairs: Sequence[PreferenceExample],
    options: TrainOptions,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    memo: PrefixMemo | None = None,
    on_epoch: Callable[[int, Fitted], None] | None = None,
) -> Fitted:
    """Train a dense or moe reward model in memory; report held-out accuracy per epoch.

    ``memo`` shares cached prefix states with other runs on the same frozen layers; ``on_epoch`` is called
    after each epoch (``train`` writes checkpoints with it).

    Raises:
        ValueError: the options do not fit the model (see ``select_trainable``; LoRA on a moe model, or
            with ``--train experts`` or ``head``).
    """
    torch.manual_seed(options.seed)
    classifier, moe_config = load_classifier(model_dir)
    model: nn.Module = classifier
    first_layer = select_trainable(model, options.trainable)
    adapter = None
    if options.lora is not None:
        if moe_config is not None or options.trainable in ("experts", "head"):
            raise ValueError(
                "--lora-rank adapts the layers --train names on a dense model: use --train top:N or all "
                f"(got --train {options.trainable} on a {'moe' if moe_config else 'dense'} model)."
            )
        model.requires_grad_(False)
        adapter, model = add_lora(model, options.lora, range(first_layer, len(decoder_layers(model))))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = options.trainable + (f", LoRA rank {options.lora.rank}" if options.lora else "")
    echo(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
         f"{trained / 1e6:.2f}M trained ({what}); layers below {first_layer} frozen and cached")  # fmt: skip
    encoder = encoder_for(model_dir, model, options.max_length)
    pad_id = pad_token_id(encoder.tokenizer, config_of(model))
    train_data, eval_data = encode_pairs(encoder, train_pairs), encode_pairs(encoder, eval_pairs)
    cache_prefix(model, train_data, first_layer, progress, memo)
    cache_prefix(model, eval_data, first_layer, progress, memo)
    history = [
        {"epoch": 0, "held_out_accuracy": accuracy(model, eval_data, first_layer, pad_id, options.batch_size)}
    ]
    echo(f"epoch 0: held-out accuracy {history[0]['held_out_accuracy']:.4f} ({len(eval_data)} pairs)")
    fitted = Fitted(model, adapter, encoder, moe_config, first_layer, pad_id, eval_data, {"history": history})
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
            weights = train_data.weights[indices]  # (B,)
            loss = pair_loss(r, options.bsr_strength, options.bsr_form, weights) + options.aux * balance_loss(
                model
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        held = accuracy(model, eval_data, first_layer, pad_id, options.batch_size)
        history.append({"epoch": epoch, "held_out_accuracy": held})
        echo(f"epoch {epoch}: held-out accuracy {held:.4f}")
        if on_epoch is not None:
            on_epoch(epoch, fitted)
    model.eval()
    interval = binomial_interval(round(history[-1]["held_out_accuracy"] * len(eval_data)), len(eval_data))
    fitted.results.update(
        held_out_accuracy=history[-1]["held_out_accuracy"],
        held_out_standard_error=round(interval.standard_error, 4),
        trained_parameters=trained,
        first_trained_layer=first_layer,
    )
    return fitted


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
    data_source: str = "",
) -> dict[str, Any]:
    """``fit``, then write ``out``: the trained model and its training record (``training.json``).

    ``out`` gets a dense folder, a moe folder, or with ``options.lora`` a peft adapter folder (kind
    ``lora``); each epoch's model also goes to ``out/checkpoint-epoch-N``.
    """
    started = time.monotonic()

    def checkpoint(epoch: int, fitted: Fitted) -> None:
        _Saver(model_dir, fitted, options).save(out / f"checkpoint-epoch-{epoch}", fitted.results)

    fitted = fit(model_dir, train_pairs, eval_pairs, options, progress=progress, echo=echo, memo=memo, on_epoch=checkpoint)  # fmt: skip
    _Saver(model_dir, fitted, options).save(out, fitted.results)
    data = data_record(train_pairs, eval_pairs, data_source)
    record = write_record(out, command="rmserve train", data=data, options=options, results=fitted.results, started=started)  # fmt: skip
    echo(f"wrote {out} in {record['seconds']:.0f}s")
    return record


class _Saver:
    """Writes the model being trained in its folder format: dense, moe, or a peft adapter (lora)."""

    def __init__(self, model_dir: Path, fitted: Fitted, options: TrainOptions) -> None:
        self.model_dir, self.model, self.adapter, self.encoder = (
            model_dir,
            fitted.model,
            fitted.adapter,
            fitted.encoder,
        )
        self.moe_config, self.options = fitted.moe_config, options

    def save(self, out: Path, results: dict[str, Any]) -> None:
        self.model.eval()
        if self.adapter is not None:
            save_adapter(self.adapter, self.model_dir, self.encoder.tokenizer, out, TRAINED_POOLING)
            return
        if not isinstance(self.model, PreTrainedModel):
            raise TypeError(f"cannot save a {type(self.model).__name__}; expected a transformers model.")
        if self.moe_config is None:
            self.model.save_pretrained(out)
            self.encoder.tokenizer.save_pretrained(out)
            write_dense_descriptor(out, TRAINED_POOLING)
            return
        training = {"results": results, "options": plain(self.options)}
        update = {"training": training, "pooling": TRAINED_POOLING}
        save_moe(self.model, self.encoder.tokenizer, out, self.moe_config.model_copy(update=update))
