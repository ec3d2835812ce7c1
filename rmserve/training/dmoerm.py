"""``rmserve train-dmoerm``: DMoERM's three training phases per category, and its router.

Per task category (DMoERM section 4.2.2; one category named ``--category`` when the data has none):

1. task-specific training: the backbone's top N layers, final norm and score head fine-tuned with
   Bradley-Terry on a ``phase1_share`` of the category's training items (the paper: 60%, full
   fine-tuning; here the top N layers, so that every category shares the trunk below them), written as
   the category's base, a standard HF checkpoint;
2. capability training: per capability point, a LoRA adapter on the base's top N layers (the paper's
   rank 32, alpha 32, q_proj and v_proj, dropout 0.05) plus a score head initialised from the base's,
   trained on the category's items labelled for that capability (all of them, as the paper reuses all
   task data; ties are skipped), written in peft's format;
3. ensemble training: the heads set aside, an MLP ``Linear(k*H -> H), PReLU, Linear(H -> 1)`` over the
   concatenated final hidden states of the k experts, trained with everything else frozen on the
   remaining items (40%). The experts are frozen, so their states are computed once and the MLP trains
   on them.

Then, with two or more categories, the router: ``Linear(H -> C)`` over the mean trunk state of each
item's prompt, trained with cross-entropy on the category labels. The loss everywhere is Bradley-Terry,
listwise over a ranked list's pairs (``training.ranked``). Held-out accuracy is reported per phase
(phase 1 and the MLP on human labels; each expert on its capability's labels where held-out items carry
them, and on the human labels), and for the whole model as served (``rmserve.models.dmoerm``).

The paper's optimiser settings (minibatch 1, learning rates 1e-7 / 5e-5 / 1e-6, early stopping on a
validation set) are for a 1.8B model on GPUs; the defaults here are sized for the top layers of a small
model on a CPU, and every value is an option, recorded in ``training.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from rmserve.config import LoadOptions
from rmserve.models.base import reward_values
from rmserve.models.decoder import config_of
from rmserve.models.dmoerm import (
    MLP_FILE,
    ROUTER_FILE,
    DmoermConfig,
    aggregation_mlp,
    category_dir,
    expert_dir,
    prompt_means,
    task_router,
    write_dmoerm_config,
)
from rmserve.models.inputs import InputEncoder
from rmserve.models.loader import load_model
from rmserve.models.moe import decoder_layers
from rmserve.models.pooling import write_dense_descriptor
from rmserve.training.branches import features, head_linear
from rmserve.training.fitting import binomial_interval
from rmserve.training.lora import LoraSpec, save_adapter
from rmserve.training.pairs import PreferenceExample
from rmserve.training.prefix import prefix_states
from rmserve.training.ranked import RankedItem, capability_names
from rmserve.training.record import data_record, refuse_nonempty, write_record
from rmserve.training.trainer import (
    TRAINED_POOLING,
    PairData,
    PrefixMemo,
    TrainOptions,
    cache_prefix,
    encode_pairs,
    fit,
    pair_loss,
)

PAPER_LORA = LoraSpec(rank=32, alpha=32, targets=("q_proj", "v_proj"), dropout=0.05)


@dataclass(frozen=True)
class DmoermOptions:
    """Hyper-parameters of ``train_dmoerm`` (see the module docstring)."""

    top: int = 2
    epochs: int = 1
    phase1_share: float = 0.6
    phase1_lr: float = 1e-4
    expert_lr: float = 5e-4
    lora: LoraSpec = PAPER_LORA
    mlp_epochs: int = 20
    mlp_lr: float = 1e-3
    router_epochs: int = 100
    router_lr: float = 1e-2
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    capabilities: tuple[str, ...] = ()
    category: str = "all"

    def __post_init__(self) -> None:
        if self.top < 1:
            raise ValueError(f"--top must be at least 1, got {self.top}.")
        if not 0 < self.phase1_share < 1:
            raise ValueError(
                f"--phase1-share must lie in (0, 1): phase 3 needs the rest; got {self.phase1_share}."
            )

    def fit_options(self, *, lr: float, lora: LoraSpec | None) -> TrainOptions:
        """``fit``'s options for phase 1 (no LoRA) or an expert (LoRA)."""
        return TrainOptions(
            trainable=f"top:{self.top}", epochs=self.epochs, lr=lr, batch_size=self.batch_size, bsr=0.0,
            max_length=self.max_length, seed=self.seed, lora=lora,
        )  # fmt: skip


def expand(items: Sequence[RankedItem]) -> list[PreferenceExample]:
    """Every item's ordered pairs, weighted (``RankedItem.pairs``)."""
    return [pair for item in items for pair in item.pairs()]


def accuracy_record(wins: int, n: int) -> dict[str, float]:
    """A held-out accuracy with its standard error."""
    interval = binomial_interval(wins, n)
    return {
        "accuracy": round(interval.value, 4),
        "standard_error": round(interval.standard_error, 4),
        "pairs": n,
    }


def train_mlp(
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor], held: tuple[torch.Tensor, torch.Tensor],
    experts: int, options: DmoermOptions, progress: bool,
) -> tuple[nn.Sequential, list[float]]:  # fmt: skip
    """Phase 3 on frozen features: chosen (N, k*H), rejected (N, k*H), weights (N,); held-out accuracy per epoch."""
    chosen, rejected, weights = train
    torch.manual_seed(options.seed)
    mlp = aggregation_mlp(experts, chosen.shape[1] // experts)
    optimiser = torch.optim.Adam(mlp.parameters(), lr=options.mlp_lr)
    generator = torch.Generator().manual_seed(options.seed)
    history = []
    for _ in tqdm(range(options.mlp_epochs), desc="phase 3: MLP", disable=not progress):
        mlp.train()
        order = torch.randperm(len(chosen), generator=generator)
        for start in range(0, len(order), options.batch_size):
            batch = order[start : start + options.batch_size]
            rewards = mlp(torch.cat([chosen[batch], rejected[batch]]))[:, 0]  # (2B,)
            loss = pair_loss(rewards, 0.0, weights=weights[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        mlp.eval()
        with torch.no_grad():
            history.append(float((mlp(held[0])[:, 0] > mlp(held[1])[:, 0]).float().mean()))
    return mlp.eval(), history


def train_router(
    train: tuple[torch.Tensor, torch.Tensor], held: tuple[torch.Tensor, torch.Tensor], categories: int,
    options: DmoermOptions, progress: bool,
) -> tuple[nn.Linear, float]:  # fmt: skip
    """The router on prompt states (N, H) and category indices (N,), full batch; its held-out accuracy."""
    states, labels = train
    torch.manual_seed(options.seed)
    router = task_router(states.shape[1], categories)
    optimiser = torch.optim.Adam(router.parameters(), lr=options.router_lr)
    for _ in tqdm(range(options.router_epochs), desc="router", disable=not progress):
        loss = F.cross_entropy(router(states), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        held_accuracy = (
            float((router(held[0]).argmax(-1) == held[1]).float().mean()) if len(held[1]) else math.nan
        )
    return router.eval(), held_accuracy


class _PromptStates:
    """Each item's prompt state for the router: the mean trunk state over its first response's prompt tokens."""

    def __init__(self, backbone: Path, tokenizer: Any, split: int, max_length: int, memo: PrefixMemo) -> None:
        self.model = AutoModelForSequenceClassification.from_pretrained(backbone, dtype=torch.float32).eval()
        self.encoder = InputEncoder(
            tokenizer, max_length=max_length, vocab_size=config_of(self.model).vocab_size, text_pairs=False,
            prompt_spans=True,
        )  # fmt: skip
        self.split, self.memo = split, memo

    def __call__(self, items: Sequence[RankedItem]) -> torch.Tensor:
        rows = []
        for item in items:
            encoded = self.encoder.encode(item.responses[0], "left")
            key = (self.split, tuple(encoded.token_ids))
            if key not in self.memo:
                self.memo[key] = prefix_states(self.model, torch.tensor([encoded.token_ids]), self.split)[0]
            states = self.memo[key][None]  # (1, T, H)
            rows.append(prompt_means(states, torch.tensor([encoded.prompt_tokens or len(encoded)]))[0])
        return torch.stack(rows) if rows else torch.empty(0, config_of(self.model).hidden_size)  # (N, H)


def _served_accuracy(out: Path, pairs: Sequence[PreferenceExample], batch_size: int) -> int:
    """How many held-out pairs the written model, loaded as served (float32, CPU), ranks right."""
    model = load_model("dmoerm", out, LoadOptions(dtype="float32", device="cpu"))
    encoder = model.new_encoder()
    wins = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        encoded = encoder.encode_many([p.chosen for p in chunk] + [p.rejected for p in chunk])
        r = reward_values(model, encoded)
        wins += sum(a > b for a, b in zip(r[: len(chunk)], r[len(chunk) :], strict=True))
    return wins


@dataclass
class _Category:
    """What one category's training leaves for the rest: its record, and the backbone facts it saw."""

    record: dict[str, Any]
    layers: int
    tokenizer: Any
    model_config: Any


def _train_category(
    backbone: Path, c: str, items: Sequence[RankedItem], held: Sequence[RankedItem], capabilities: Sequence[str],
    out: Path, options: DmoermOptions, memo: PrefixMemo, progress: bool, echo: Callable[[str], None],
) -> _Category:  # fmt: skip
    """Phases 1-3 of one category; writes its base, experts and MLP under ``out``.

    Raises:
        ValueError: the category lacks items for a phase, or a capability has no labelled pair.
    """
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(options.seed)).tolist()
    cut = round(options.phase1_share * len(items))
    phase1, phase3 = [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]
    if not phase1 or not phase3 or not held:
        raise ValueError(
            f"category {c!r} has {len(phase1)} phase-1, {len(phase3)} phase-3 and {len(held)} held-out items; "
            "each needs at least one: give the category more items."
        )
    held_pairs = expand(held)
    echo(f"category {c}: phase 1 on {len(phase1)} items, phase 3 on {len(phase3)}, {len(held)} held out")
    fitted = fit(backbone, expand(phase1), held_pairs, options.fit_options(lr=options.phase1_lr, lora=None),
                 progress=progress, echo=echo, memo=memo)  # fmt: skip
    base = category_dir(out, c) / "base"
    if not isinstance(fitted.model, PreTrainedModel):
        raise TypeError(f"phase 1 gave a {type(fitted.model).__name__}, not a transformers model.")
    fitted.model.save_pretrained(base)
    fitted.encoder.tokenizer.save_pretrained(base)
    write_dense_descriptor(base, TRAINED_POOLING)
    done = _Category({}, len(decoder_layers(fitted.model)), fitted.encoder.tokenizer, config_of(fitted.model))
    phase3_data = encode_pairs(fitted.encoder, expand(phase3))
    cache_prefix(fitted.model, phase3_data, fitted.first_layer, progress, memo)
    eval_data: PairData = fitted.eval_data
    held_n = len(eval_data)
    record: dict[str, Any] = {
        "items": {"phase_1": len(phase1), "phase_3": len(phase3), "held_out": len(held)},
        "phase_1": accuracy_record(round(fitted.results["held_out_accuracy"] * held_n), held_n),
        "experts": {},
    }
    del fitted
    train_states: list[tuple[torch.Tensor, torch.Tensor]] = []
    held_states: list[tuple[torch.Tensor, torch.Tensor]] = []
    for capability in capabilities:
        labelled = [p for item in items if (p := item.capability_pair(capability)) is not None]
        labelled_held = [p for item in held if (p := item.capability_pair(capability)) is not None]
        if not labelled:
            raise ValueError(
                f"category {c!r} has no training pair labelled for capability {capability!r} (ties do not count); "
                "label more pairs, or name the capabilities to train with --capability."
            )
        echo(f"category {c}, expert {capability}: {len(labelled)} labelled pairs")
        expert = fit(base, labelled, labelled_held or held_pairs,
                     options.fit_options(lr=options.expert_lr, lora=options.lora),
                     progress=progress, echo=echo, memo=memo)  # fmt: skip
        folder = expert_dir(out, c, capability)
        save_adapter(expert.adapter, base, expert.encoder.tokenizer, folder, TRAINED_POOLING)
        train_states.append(features(expert, phase3_data))
        chosen, rejected = features(expert, eval_data)
        held_states.append((chosen, rejected))
        head = head_linear(expert.model)
        with torch.no_grad():
            wins = int((head(chosen)[:, 0] > head(rejected)[:, 0]).sum())
        own = None
        if labelled_held:
            own = accuracy_record(
                round(expert.results["held_out_accuracy"] * len(labelled_held)), len(labelled_held)
            )
        record["experts"][capability] = {
            "labelled_pairs": len(labelled),
            "capability_held_out": own,
            "human_held_out": accuracy_record(wins, held_n),
        }
        echo(f"  expert {capability}: held-out human-label accuracy {wins / held_n:.4f}")
    chosen_k, rejected_k = (torch.cat([s[i] for s in train_states], dim=-1) for i in (0, 1))  # (N, k*H) each
    held_k = (torch.cat([s[0] for s in held_states], -1), torch.cat([s[1] for s in held_states], -1))
    mlp, history = train_mlp(
        (chosen_k, rejected_k, phase3_data.weights), held_k, len(capabilities), options, progress
    )
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, category_dir(out, c) / MLP_FILE)
    record["phase_3"] = accuracy_record(round(history[-1] * held_n), held_n) | {"history": history}
    echo(
        f"category {c}: phase 1 {record['phase_1']['accuracy']:.4f}, phase 3 (MLP) {history[-1]:.4f} held out"
    )
    done.record.update(record)
    return done


def train_dmoerm(
    backbone: Path,
    train_items: Sequence[RankedItem],
    eval_items: Sequence[RankedItem],
    out: Path,
    options: DmoermOptions,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    data_source: str = "",
    memo: PrefixMemo | None = None,
) -> dict[str, Any]:
    """Run the three phases per category and the router; write the ``dmoerm`` folder ``out`` and its record.

    Raises:
        ValueError: ``out`` is not empty, a category lacks items for a phase, or a capability has no labels.
    """
    started = time.monotonic()
    refuse_nonempty(out)
    capabilities = list(options.capabilities) or capability_names(list(train_items))
    if not capabilities:
        raise ValueError(
            "the training data has no capability labels: label it first (rmserve dmoerm label writes "
            '"capabilities" on each pair), or name --capability points that the data labels.'
        )

    def category_of(item: RankedItem) -> str:
        return item.category or options.category

    categories = list(dict.fromkeys(category_of(item) for item in train_items))
    unknown = sorted({category_of(item) for item in eval_items} - set(categories))
    if unknown:
        raise ValueError(f"held-out items have categories no training item has: {', '.join(unknown)}.")
    memo = {} if memo is None else memo
    results: dict[str, Any] = {"categories": {}}
    done: _Category | None = None
    for c in categories:
        items = [item for item in train_items if category_of(item) == c]
        held = [item for item in eval_items if category_of(item) == c]
        done = _train_category(backbone, c, items, held, capabilities, out, options, memo, progress, echo)
        results["categories"][c] = done.record
    assert done is not None
    split = done.layers - options.top
    if len(categories) > 1:
        states = _PromptStates(backbone, done.tokenizer, split, options.max_length, memo)
        index = {c: i for i, c in enumerate(categories)}
        labels = torch.tensor([index[category_of(item)] for item in train_items])
        held_labels = torch.tensor([index[category_of(item)] for item in eval_items])
        router, routing = train_router((states(train_items), labels), (states(eval_items), held_labels),
                                       len(categories), options, progress)  # fmt: skip
        save_file({k: v.contiguous() for k, v in router.state_dict().items()}, out / ROUTER_FILE)
        results["router_held_out_accuracy"] = round(routing, 4)
        echo(f"router: held-out category accuracy {routing:.4f}")
    done.tokenizer.save_pretrained(out)
    done.model_config.save_pretrained(out)
    config = DmoermConfig(
        trunk_layers=split,
        categories=tuple(categories),
        capabilities=tuple(capabilities),
        pooling=TRAINED_POOLING,
    )
    write_dmoerm_config(out, config)
    held_pairs = expand(eval_items)
    wins = _served_accuracy(out, held_pairs, options.batch_size)
    results["held_out"] = accuracy_record(wins, len(held_pairs))
    echo(f"dmoerm as served: held-out accuracy {wins / len(held_pairs):.4f} ({len(held_pairs)} pairs)")
    data = data_record(expand(train_items), held_pairs, data_source)
    record = write_record(
        out, command="rmserve train-dmoerm", data=data, options=options, results=results, started=started
    )
    echo(f"wrote {out} in {record['seconds']:.0f}s")
    return record
