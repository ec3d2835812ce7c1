"""Branched reward models (kind ``branched``): one shared trunk, k branches of top layers, a reward each.

A dense decoder of L layers is split at ``trunk_layers = L - N``: the trunk (embeddings and layers
0..L-N-1) runs once per batch, and each of the k branches runs its own copy of the top N layers, its
own final norm and its own head on the trunk's output. That is an ensemble whose members really differ
(each trained on its own share of the pairs) at ``(L - N + kN) / L`` of one dense forward. Each branch
gives one head reward (``multihead``) or a mean and a sigma (``brme``); the k rewards go through the
robust aggregates like any multi-head model.

On disk::

    rmserve.json        {"kind": "branched", "base": "/abs/base", "trunk_layers": 28,
                         "branches": ["branch-0", ...], "form": "full" | "lora", "head_kind": ..., ...}
    config.json, tokenizer files   (the base's)
    branch-i/           form lora: a peft adapter folder on the base (LoRA on the top N layers and the
                        score head through modules_to_save); form full: branch.safetensors, the top N
                        layers, final norm and score head under the classifier's own state-dict names
    branch-i/head.safetensors      "bias" (1,): the branch's offset (its rewards are centred on its
                        training responses, so the branches share a zero); brme also "std_weight" (1, H)
                        and "std_bias" (1,)

Branch i's reward is what transformers (with peft for ``lora``) computes for the base with that branch's
weights, plus ``bias``: ``score(h) + bias``, with ``h`` the final hidden state at the scored token
(``tests/models/test_branched_models.py`` checks this per branch, offline, in float32). For ``brme``,
``sigma = softplus(std_weight . h + std_bias) + eps``, and the nominal head of each input is the
branch with the smallest sigma.

Serving keeps one trunk and k branch stacks (LoRA branches merged into their copies at load). The
trunk's output is fed to each branch as ``inputs_embeds`` with the base model's own forward running only
that branch's layers, which is exact for decoders whose forward does not rescale ``inputs_embeds``
(Llama, Qwen2, Mistral, ...): a load-time check compares the split forward with the plain one and
refuses other architectures.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.cache_utils import Cache

from rmserve.aggregation import AggregationParams, aggregate_rows, brme_nominal_index
from rmserve.batching.prefix import PrefixGroup, PrefixPlan
from rmserve.config import LoadOptions
from rmserve.models.base import (
    MetaPart,
    ModelInfo,
    module_bytes,
    parameter_count,
    resolve_device,
    resolve_dtype,
)
from rmserve.models.compile import check_compilable
from rmserve.models.decoder import (
    base_of,
    config_of,
    embeddings_of,
    folder_max_length,
    meta_classifier,
    pad_token_id,
    resolve_max_length,
    right_padded,
    score_head_of,
)
from rmserve.models.descriptor import DESCRIPTOR, read_descriptor
from rmserve.models.heads import check_nominal_head, default_reward
from rmserve.models.inputs import EncodedInput, InputEncoder
from rmserve.models.lora import load_merged_classifier
from rmserve.models.moe import decoder_layers
from rmserve.models.pooling import log_pooling, pooling_rule
from rmserve.models.prefix import frozen_layers, new_cache, padded_rows, scored_positions, shared_cache
from rmserve.names import DEFAULT_POOLING, AggregateName, HeadKind, Pooling
from rmserve_kernels.heads import HeadOutputs

BRANCH_WEIGHTS = "branch.safetensors"
HEAD_FILE = "head.safetensors"
DEFAULT_EPS = 0.01


class BranchedConfig(BaseModel):
    """``rmserve.json`` of a ``branched`` folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["branched"] = "branched"
    base: str = Field(
        description="The dense base model folder (absolute path): the trunk and the branches' start."
    )
    trunk_layers: int = Field(
        ge=0, description="Layers in the shared trunk (L - N); the branches hold the rest."
    )
    branches: tuple[str, ...] = Field(min_length=1, description="The branch folders, relative to this one.")
    form: Literal["full", "lora"] = Field(
        description="full: each branch's own top layers; lora: peft adapters."
    )
    head_kind: HeadKind = Field(description="multihead: one reward per branch; brme: a mean and a sigma.")
    nominal_head: int | None = Field(0, ge=0, description="multihead: the nominal branch; brme: null.")
    reward: AggregateName | None = Field(
        None, description="'rewards'; default tradeoff (brme), mean (multihead)."
    )
    uwo_lambda: float = Field(1.0, ge=0, allow_inf_nan=False)
    tradeoff_lambda: float = Field(0.6, ge=0, le=1, allow_inf_nan=False)
    eps: float = Field(DEFAULT_EPS, ge=0, allow_inf_nan=False, description="brme: sigma floor.")
    pooling: Pooling | None = Field(None, description="The token the heads read; unset: hf.")

    @model_validator(mode="after")
    def _nominal(self) -> BranchedConfig:
        check_nominal_head(self.head_kind, self.nominal_head, len(self.branches))
        return self

    @property
    def default_reward(self) -> AggregateName:
        return default_reward(self.head_kind, self.reward)


def read_branched_config(path: Path) -> BranchedConfig:
    """The folder's descriptor, checked against the files it names.

    Raises:
        ValueError: the descriptor is invalid, the base folder is gone, or a branch is incomplete.
    """
    config = read_descriptor(path, BranchedConfig, "branched", "train one with rmserve train-branches")
    if not (Path(config.base) / "config.json").is_file():
        raise ValueError(
            f"{path / DESCRIPTOR} names base {config.base}, which is not a model folder (no config.json); put the "
            "base model back there, or edit 'base' to where it now is."
        )
    weights = "adapter_config.json" if config.form == "lora" else BRANCH_WEIGHTS
    for branch in config.branches:
        for file in (weights, HEAD_FILE):
            if not (path / branch / file).is_file():
                raise ValueError(f"branch {branch} of {path} has no {file}; the folder is incomplete.")
    return config


def write_branched_config(path: Path, config: BranchedConfig) -> None:
    """Write the folder's ``rmserve.json``."""
    (path / DESCRIPTOR).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")


def load_branch_classifier(path: Path, config: BranchedConfig, branch: str, dtype: torch.dtype) -> nn.Module:
    """Branch ``branch`` as a whole classifier: the base with the branch's weights (LoRA merged)."""
    folder = path / branch
    if config.form == "lora":
        return load_merged_classifier(folder, dtype, base=Path(config.base))
    model = AutoModelForSequenceClassification.from_pretrained(config.base, dtype=dtype)
    state = load_file(folder / BRANCH_WEIGHTS)
    unknown = sorted(set(state) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"{folder / BRANCH_WEIGHTS} has weights the base does not: {unknown[:3]}; it belongs to another base.")  # fmt: skip
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    return model.eval()


def branch_head(path: Path, branch: str, hidden: int, head_kind: HeadKind) -> dict[str, torch.Tensor]:
    """The branch's head tensors, float32, shapes checked."""
    tensors = {k: v.float() for k, v in load_file(path / branch / HEAD_FILE).items()}
    want = {"bias": (1,)} | ({"std_weight": (1, hidden), "std_bias": (1,)} if head_kind == "brme" else {})
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        raise ValueError(f"{path / branch / HEAD_FILE} holds {got}; a {head_kind} branch needs {want}.")
    return tensors


def norm_name(base: nn.Module) -> str:
    """The attribute of the base model's final norm (``norm`` or ``final_layer_norm``)."""
    for name in ("norm", "final_layer_norm"):
        if isinstance(getattr(base, name, None), nn.Module):
            return name
    raise ValueError(f"{type(base).__name__} has no final norm named norm or final_layer_norm.")


@contextmanager
def running(base: nn.Module, layers: nn.ModuleList, norm: nn.Module) -> Iterator[None]:
    """Within the block, ``base``'s forward runs ``layers`` and ends with ``norm``."""
    name = norm_name(base)
    saved_layers, saved_norm = base.layers, getattr(base, name)
    base.layers = layers
    setattr(base, name, norm)
    try:
        yield
    finally:
        base.layers = saved_layers
        setattr(base, name, saved_norm)


class BranchStack(nn.Module):
    """One branch: its top layers, final norm and score head."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module, score: nn.Linear) -> None:
        super().__init__()
        self.layers: nn.ModuleList = layers
        self.norm: nn.Module = norm
        self.score: nn.Linear = score


def run_trunk(
    base: nn.Module, trunk_layers: nn.ModuleList, ids: torch.Tensor, cache: Cache | None = None
) -> torch.Tensor:
    """The hidden states leaving the trunk (``base``'s embeddings and ``trunk_layers``), (B, T, H).

    ``cache``: filled by a prefix forward, or read by a suffix forward (``rmserve.models.prefix``).
    """
    with running(base, trunk_layers, nn.Identity()):
        return base(input_ids=ids, cache=cache, use_cache=cache is not None).last_hidden_state


def run_stack(
    base: nn.Module, stack: BranchStack, states: torch.Tensor, cache: Cache | None = None
) -> torch.Tensor:
    """One stack's final hidden states from the trunk's ``states`` (B, T, H), (B, T, H); ``cache`` as for
    ``run_trunk`` (its first layer must say how many tokens precede, so positions continue from them)."""
    with running(base, stack.layers, stack.norm):
        return base(inputs_embeds=states, cache=cache, use_cache=cache is not None).last_hidden_state


def planned_branch_states(
    base: nn.Module,
    trunk_layers: nn.ModuleList,
    branches: Sequence[BranchStack],
    batch: Sequence[EncodedInput],
    plan: PrefixPlan,
    positions: Sequence[int],
    pad_id: int,
) -> torch.Tensor:
    """Each branch's final hidden state at each input's scored position, computed as ``plan`` says, (B, k, H)."""
    device = next(base.parameters()).device
    pooled: list[torch.Tensor | None] = [None] * len(batch)
    if plan.rest:
        ids = padded_rows([batch[r].token_ids for r in plan.rest], pad_id, device)  # (R, T)
        states = run_trunk(base, trunk_layers, ids)  # (R, T, H)
        rows = torch.arange(len(plan.rest), device=device)  # (R,)
        at = torch.tensor([positions[r] for r in plan.rest], device=device)  # (R,)
        rest = torch.stack([run_stack(base, b, states)[rows, at] for b in branches], dim=1)  # (R, k, H)
        for i, row in enumerate(plan.rest):
            pooled[row] = rest[i]
    for group in plan.groups:
        for row, state in _group_branch_states(base, trunk_layers, branches, batch, group, positions, pad_id):
            pooled[row] = state
    if any(state is None for state in pooled):
        raise ValueError("the prefix plan leaves rows of the batch uncomputed.")
    return torch.stack([state for state in pooled if state is not None])  # (B, k, H)


def _group_branch_states(
    base: nn.Module,
    trunk_layers: nn.ModuleList,
    branches: Sequence[BranchStack],
    batch: Sequence[EncodedInput],
    group: PrefixGroup,
    positions: Sequence[int],
    pad_id: int,
) -> list[tuple[int, torch.Tensor]]:
    """One prefix group's (row, (k, H) state) pairs: the trunk and each stack run the prefix once.

    A stack's suffix cache holds its own layers' prefix keys and values and, in the trunk's slots, the
    trunk's (so its first layer reports the prefix length: positions and mask continue from it).
    """
    device = next(base.parameters()).device
    p = group.prefix
    prefix_ids = torch.tensor([batch[group.rows[0]].token_ids[:p]], device=device)  # (1, P)
    trunk_cache = new_cache() if len(trunk_layers) else None  # a trunk of no layers has nothing to cache
    trunk_prefix = run_trunk(base, trunk_layers, prefix_ids, trunk_cache)  # (1, P, H)
    trunk_frozen = frozen_layers(trunk_cache) if trunk_cache is not None else []
    stack_frozen, stack_prefix = [], []
    for stack in branches:
        cache = new_cache()
        stack_prefix.append(run_stack(base, stack, trunk_prefix, cache)[0])  # (P, H)
        layers = frozen_layers(cache)
        layers[: len(trunk_frozen)] = trunk_frozen
        stack_frozen.append(layers)
    out = []
    for rows in group.suffix_batches:
        ids = padded_rows([batch[r].token_ids[p:] for r in rows], pad_id, device)  # (S, T)
        states = run_trunk(base, trunk_layers, ids, shared_cache(trunk_frozen) if trunk_frozen else None)
        finals = [
            run_stack(base, stack, states, shared_cache(layers))  # (S, T, H)
            for stack, layers in zip(branches, stack_frozen, strict=True)
        ]
        for i, row in enumerate(rows):
            at = positions[row]
            if at < p:
                out.append((row, torch.stack([h[at] for h in stack_prefix])))  # (k, H)
            else:
                out.append((row, torch.stack([h[i, at - p] for h in finals])))  # (k, H)
    return out


@torch.inference_mode()
def check_split(
    base: nn.Module, trunk_layers: nn.ModuleList, stack: BranchStack, vocab_size: int, kind: str
) -> None:
    """Refuse an architecture whose forward rescales ``inputs_embeds`` (the split would not be exact).

    Raises:
        ValueError: the trunk then ``stack`` differ from one plain forward through the same layers.
    """
    device = next(base.parameters()).device
    ids = torch.arange(1, 9, device=device)[None, :] % vocab_size  # (1, 8)
    split = run_stack(base, stack, run_trunk(base, trunk_layers, ids))  # (1, 8, H)
    with running(base, nn.ModuleList([*trunk_layers, *stack.layers]), stack.norm):
        plain = base(input_ids=ids, use_cache=False).last_hidden_state  # (1, 8, H)
    if not torch.allclose(split.float(), plain.float(), rtol=1e-3, atol=1e-3):
        raise ValueError(
            f"{type(base).__name__} changes inputs_embeds inside its forward, so the trunk and the top layers "
            f"cannot be run apart exactly; {kind} models support Llama, Qwen2, Mistral-style decoders."
        )


class BranchedRewardModel:
    """A ``branched`` folder loaded for serving (see the module docstring).

    Raises:
        ValueError: the folder is not a valid branched model, quantisation was asked for, or the base's
            architecture rescales ``inputs_embeds`` (the split forward would not be exact).
    """

    kind = "branched"

    def __init__(self, name: str, path: str | Path, options: LoadOptions = LoadOptions()) -> None:
        path = Path(path)
        self.config = config = read_branched_config(path)
        if options.quantize != "none":
            raise ValueError("branched models are served unquantised; use --quantize none.")
        if options.compile:
            check_compilable(name, self.kind, options.quantize)
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        first = load_branch_classifier(path, config, config.branches[0], self.dtype)
        base = base_of(first)
        layers = decoder_layers(first)
        if not 0 <= config.trunk_layers < len(layers):
            raise ValueError(f"trunk_layers={config.trunk_layers} leaves no layer for the branches of a {len(layers)}-layer base.")  # fmt: skip
        split = config.trunk_layers
        self.trunk_layers = nn.ModuleList(list(layers)[:split])
        norm = norm_name(base)
        branches = [
            BranchStack(nn.ModuleList(list(layers)[split:]), getattr(base, norm), score_head_of(first))
        ]
        for branch in config.branches[1:]:
            other = load_branch_classifier(path, config, branch, self.dtype)
            top = nn.ModuleList(list(decoder_layers(other))[split:])
            branches.append(BranchStack(top, getattr(base_of(other), norm), score_head_of(other)))
        self.branches: list[BranchStack] = branches
        self._branch_modules = nn.ModuleList(branches)
        base.layers = self.trunk_layers  # the first branch's own stack lives on in branches[0]
        self.base = base.to(self.device).eval()
        self._branch_modules.to(self.device).eval()
        hidden = embeddings_of(base).embedding_dim
        heads = [branch_head(path, b, hidden, config.head_kind) for b in config.branches]
        self.bias = torch.cat([h["bias"] for h in heads]).to(self.device)  # (k,)
        self.std_weight = torch.cat([h["std_weight"] for h in heads]).to(self.device) if config.head_kind == "brme" else None  # (k, H)  # fmt: skip
        self.std_bias = torch.cat([h["std_bias"] for h in heads]).to(self.device) if config.head_kind == "brme" else None  # (k,)  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(path)
        model_config = config_of(first)
        self.pad_id = pad_token_id(tokenizer, model_config)
        self.pooling = pooling_rule(options.pooling or config.pooling or DEFAULT_POOLING, model_config)
        log_pooling(name, self.pooling, tokenizer)
        self.max_length = resolve_max_length(model_config, tokenizer, options.max_length)
        self.vocab_size = embeddings_of(base).num_embeddings
        self._tokenizer_path = path
        check_split(self.base, self.trunk_layers, self.branches[0], self.vocab_size, "branched")
        names = tuple(f"branch-{i}" for i in range(len(config.branches)))
        weights = module_bytes(self.base) + module_bytes(self._branch_modules)
        self.info = ModelInfo(
            name=name,
            kind=self.kind,
            architecture=f"{type(first).__name__}: trunk of {split} layers + {len(names)} {config.form} branches "
            f"of {len(layers) - split} layers ({config.head_kind})",
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            max_length=self.max_length,
            parameters=parameter_count(self.base) + parameter_count(self._branch_modules),
            path=str(path),
            weights_bytes=weights,
            pooling=self.pooling.name,
            shares_prefixes=True,
            heads=names,
            has_std=config.head_kind == "brme",
            nominal_head=config.nominal_head,
            reward=config.default_reward,
            defaults=AggregationParams(config.uwo_lambda, config.tradeoff_lambda),
        )

    @classmethod
    def meta_parts(cls, path: Path, options: LoadOptions) -> list[MetaPart]:
        """The base classifier on meta (trunk and one branch), the other k - 1 branches as extra weights."""
        config = read_branched_config(path)
        base_config = AutoConfig.from_pretrained(config.base)
        dtype = resolve_dtype(options.dtype, resolve_device(options.device))
        classifier = meta_classifier(base_config, dtype)
        layers = decoder_layers(classifier)
        norm = getattr(base_of(classifier), norm_name(base_of(classifier)))
        branch = nn.ModuleList([*list(layers)[config.trunk_layers :], norm, score_head_of(classifier)])
        extra = (len(config.branches) - 1) * parameter_count(branch)
        return [
            MetaPart(
                folder=Path(config.base),
                module=classifier,
                max_length=folder_max_length(Path(config.base), base_config, options.max_length),
                masked=False,
                extra_bytes=extra * dtype.itemsize,
                extra_parameters=extra,
                cached_layers=config.trunk_layers
                + len(config.branches) * (len(layers) - config.trunk_layers),
            )
        ]

    def new_encoder(self, max_length: int | None = None) -> InputEncoder:
        """A fresh encoder with its own tokenizer instance (tokenizers are not thread-safe)."""
        tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
        limit = self.max_length if max_length is None else min(max_length, self.max_length)
        return InputEncoder(tokenizer, max_length=limit, vocab_size=self.vocab_size, text_pairs=False)

    @torch.inference_mode()
    def score(
        self,
        batch: Sequence[EncodedInput],
        *,
        uwo_lambda: torch.Tensor,
        tradeoff_lambda: torch.Tensor,
        plan: PrefixPlan | None = None,
    ) -> HeadOutputs:
        """Each branch's reward (and sigma for brme) with every aggregate, in batch order, on the CPU;
        ``plan``: which rows share a prefix."""
        if plan is None:
            ids, lengths = right_padded(batch, self.pad_id, self.device)
            positions = self.pooling.positions(ids, lengths)  # (B,)
            rows = torch.arange(len(batch), device=self.device)  # (B,)
            states = run_trunk(self.base, self.trunk_layers, ids)  # (B, T, H)
            pooled = torch.stack(
                [run_stack(self.base, b, states)[rows, positions] for b in self.branches], dim=1
            )  # (B, k, H)
        else:
            at = scored_positions(batch, self.pooling, self.pad_id)
            pooled = planned_branch_states(
                self.base, self.trunk_layers, self.branches, batch, plan, at, self.pad_id
            )  # (B, k, H)
        pooled = pooled.float()
        scores = torch.stack(
            [
                b.score(pooled[:, i].to(b.score.weight.dtype)).float()[:, 0]
                for i, b in enumerate(self.branches)
            ],
            dim=1,
        )  # (B, k)
        heads = scores + self.bias  # (B, k)
        head_std = None
        if self.std_weight is not None and self.std_bias is not None:
            head_std = (
                F.softplus((pooled * self.std_weight).sum(-1) + self.std_bias) + self.config.eps
            )  # (B, k)
            nominal = brme_nominal_index(head_std)
        else:
            nominal = torch.full((len(batch),), self.config.nominal_head or 0, device=self.device)
        table = aggregate_rows(heads, nominal, uwo_lambda.to(self.device), tradeoff_lambda.to(self.device))
        return HeadOutputs(heads.cpu(), None if head_std is None else head_std.cpu(), table.cpu())


def branch_cost(layers: int, top: int, branches: int) -> float:
    """The forward cost of a branched model relative to one dense forward: ``(L - N + kN) / L``."""
    if not 0 < top <= layers:
        raise ValueError(f"top must lie in 1..{layers}, got {top}.")
    return (layers - top + branches * top) / layers
