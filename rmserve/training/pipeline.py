"""``rmserve train-heads``: preference pairs -> frozen-backbone features -> trained heads -> model folder.

1. Features: every chosen and rejected input is encoded by the served model's own encoder (the
   backbone's tokenizer and chat template, left truncation to ``max_length``) and read by
   ``DecoderBackbone.pooled_states``, in length-sorted batches under a padded-token budget, exactly
   the state the served heads read.
2. Heads: ``training.heads.train_multihead`` or ``train_brme`` on the training pairs.
3. Report: held-out pairwise accuracy of every head and every aggregate (``format_report``).
4. Output: a ``multihead`` / ``brme`` folder (``models.heads.save_head_model``) whose descriptor
   records the data, the recipe and the held-out accuracies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from rmserve.aggregation import AggregationParams
from rmserve.batching.planning import UNLIMITED, BatchLimits, plan_offline
from rmserve.models.decoder import DecoderBackbone
from rmserve.models.heads import save_head_model
from rmserve.models.inputs import RewardInput
from rmserve.names import CPU_JOIN_PADDING, DTypeName, HeadKind
from rmserve.training.heads import (
    BrmeWeights,
    HeadEvaluation,
    MultiheadWeights,
    apply_brme,
    apply_multihead,
    evaluate_heads,
    format_report,
    train_brme,
    train_multihead,
)
from rmserve.training.pairs import PreferenceExample
from rmserve.training.record import data_record, write_record

Item = TypeVar("Item")


@dataclass(frozen=True)
class PairFeatures:
    """Pooled features of preference pairs: row i of both tensors is pair i."""

    chosen: torch.Tensor  # (N, H) float32
    rejected: torch.Tensor  # (N, H) float32
    tokens: int
    truncated: int
    seconds: float


def extract_features(
    backbone: DecoderBackbone,
    inputs: Sequence[RewardInput],
    *,
    max_length: int,
    max_batch_tokens: int = 8192,
    progress: bool = True,
) -> tuple[torch.Tensor, int, int]:
    """Pooled states of ``inputs``: ((N, H) float32, tokens, truncated inputs), in input order."""
    encoded = backbone.new_encoder(max_length).encode_many(inputs, "left")
    join = CPU_JOIN_PADDING if backbone.device.type == "cpu" else UNLIMITED
    limits = BatchLimits(max_batch_tokens=max_batch_tokens, max_batch_size=64, max_join_padding=join)
    features = torch.empty(len(encoded), backbone.hidden_size)  # (N, H)
    with tqdm(total=sum(map(len, encoded)), unit="tok", disable=not progress, desc="features") as bar:
        for batch in plan_offline([len(e) for e in encoded], limits):
            features[batch] = backbone.pooled_states([encoded[i] for i in batch])
            bar.update(sum(len(encoded[i]) for i in batch))
    return features, sum(map(len, encoded)), sum(e.truncated for e in encoded)


def pair_features(
    backbone: DecoderBackbone,
    pairs: Sequence[PreferenceExample],
    *,
    max_length: int,
    progress: bool = True,
) -> PairFeatures:
    """Features of both responses of every pair."""
    started = time.monotonic()
    inputs = [x for p in pairs for x in (p.chosen, p.rejected)]
    features, tokens, truncated = extract_features(backbone, inputs, max_length=max_length, progress=progress)
    return PairFeatures(features[0::2], features[1::2], tokens, truncated, time.monotonic() - started)


def split_pairs(pairs: Sequence[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(train, held-out): a seeded random ``fraction`` of the pairs (or ranked items) is held out."""
    if not 0 < fraction < 1:
        raise ValueError(f"eval fraction must lie in (0, 1), got {fraction}.")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, round(len(pairs) * fraction))
    if held >= len(pairs):
        raise ValueError(f"{len(pairs)} pairs are too few to hold out {fraction:.0%} and still train.")
    return [pairs[i] for i in order[held:]], [pairs[i] for i in order[:held]]


def fit_heads(
    kind: HeadKind, train: PairFeatures, *, heads: int, seed: int, progress: bool = True, **options: Any
) -> dict[str, torch.Tensor]:
    """Train heads on features; the result is the ``heads.safetensors`` tensors (see ``save_head_model``)."""
    if kind == "multihead":
        weights = train_multihead(
            train.chosen, train.rejected, heads=heads, seed=seed, progress=progress, **options
        )
        return {"weight": weights.weight, "bias": weights.bias}
    brme = train_brme(train.chosen, train.rejected, heads=heads, seed=seed, progress=progress, **options)
    return {
        "weight": brme.mean_weight,
        "bias": brme.mean_bias,
        "std_weight": brme.std_weight,
        "std_bias": brme.std_bias,
    }


def evaluate(
    weights: dict[str, torch.Tensor],
    features: PairFeatures,
    *,
    eps: float,
    nominal_head: int | None,
    params: AggregationParams,
) -> HeadEvaluation:
    """Pairwise accuracy of every head and aggregate of trained heads on features."""
    if "std_weight" in weights:
        brme = BrmeWeights(
            weights["weight"], weights["bias"], weights["std_weight"], weights["std_bias"], eps
        )
        mu_c, sigma_c = apply_brme(brme, features.chosen)
        mu_r, sigma_r = apply_brme(brme, features.rejected)
        return evaluate_heads(mu_c, mu_r, sigma_c, sigma_r, nominal_head=None, params=params)
    multi = MultiheadWeights(weights["weight"], weights["bias"])
    return evaluate_heads(
        apply_multihead(multi, features.chosen),
        apply_multihead(multi, features.rejected),
        None,
        None,
        nominal_head=nominal_head,
        params=params,
    )


def evaluation_record(evaluation: HeadEvaluation) -> dict[str, Any]:
    """Held-out accuracies as plain numbers, for the model descriptor."""
    return {
        "pairs": evaluation.pairs,
        "heads": [round(i.value, 4) for i in evaluation.heads],
        "aggregates": {name: round(i.value, 4) for name, i in evaluation.aggregates.items()},
        "standard_error": round(max(i.standard_error for i in evaluation.aggregates.values()), 4),
    }


def train_head_model(
    *,
    backbone: Path,
    train_pairs: Sequence[PreferenceExample],
    eval_pairs: Sequence[PreferenceExample],
    kind: HeadKind,
    heads: int,
    seed: int,
    out: Path,
    data_name: str,
    max_length: int = 1024,
    dtype: DTypeName = "auto",
    device: str = "auto",
    params: AggregationParams = AggregationParams(),
    eps: float = 0.01,
    bsr: float = 0.0,
    progress: bool = True,
    echo: Any = print,
) -> HeadEvaluation:
    """The whole pipeline; prints the held-out report through ``echo`` and writes the model folder.

    ``bsr`` (brme only): BSR's weight on the squared mean of each step's mean rewards in stage 2. Multihead
    heads are fitted full-batch with a free offset that centres each head's training rewards at 0, which
    is where eq. 25's penalty is already 0, so it has no ``bsr``.

    Raises:
        ValueError: ``bsr`` with ``multihead``, or what the trainers refuse.
    """
    if bsr and kind == "multihead":
        raise ValueError(
            "--bsr applies to brme heads (trained in mini-batches); multihead heads are centred on their "
            "training rewards, where BSR's penalty (eq. 25) is already 0: drop --bsr."
        )
    run_started = time.monotonic()
    model = DecoderBackbone(backbone.resolve(), dtype=dtype, device=device)
    echo(f"backbone {backbone}: {type(model.base).__name__}, hidden size {model.hidden_size}, {model.dtype}")
    train = pair_features(model, train_pairs, max_length=max_length, progress=progress)
    held = pair_features(model, eval_pairs, max_length=max_length, progress=progress)
    tokens = train.tokens + held.tokens
    echo(
        f"features: {2 * (len(train_pairs) + len(eval_pairs))} inputs, {tokens} tokens in "
        f"{train.seconds + held.seconds:.1f}s ({tokens / max(train.seconds + held.seconds, 1e-9):.0f} tokens/s), "
        f"{train.truncated + held.truncated} truncated to {max_length}"
    )
    started = time.monotonic()
    options = {"eps": eps, "bsr": bsr} if kind == "brme" else {}
    weights = fit_heads(kind, train, heads=heads, seed=seed, progress=progress, **options)
    echo(f"trained {heads} {kind} heads on {len(train_pairs)} pairs in {time.monotonic() - started:.1f}s")
    nominal = None if kind == "brme" else 0
    evaluation = evaluate(weights, held, eps=eps, nominal_head=nominal, params=params)
    echo(f"held-out ({len(eval_pairs)} pairs):\n{format_report(evaluation)}")
    save_head_model(
        out,
        kind=kind,
        backbone=str(backbone.resolve()),
        weights=weights,
        nominal_head=nominal,
        params=params,
        eps=eps,
        pooling=model.pooling.name,
        training={
            "data": data_name,
            "train_pairs": len(train_pairs),
            "seed": seed,
            "max_length": max_length,
            "bsr": bsr,
            "held_out": evaluation_record(evaluation),
        },
    )
    run_options = {"backbone": str(backbone), "kind": kind, "heads": heads, "seed": seed, "max_length": max_length,
                   "dtype": dtype, "device": device, "eps": eps, "bsr": bsr, "params": params}  # fmt: skip
    write_record(out, command="rmserve train-heads", data=data_record(train_pairs, eval_pairs, data_name),
                 options=run_options, results=evaluation_record(evaluation), started=run_started)  # fmt: skip
    echo(f"wrote {out}")
    return evaluation
