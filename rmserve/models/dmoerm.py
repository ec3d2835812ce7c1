"""DMoERM reward models (kind ``dmoerm``): a task router over per-category capability experts and an MLP.

The double-layer MoE of the DMoERM paper (sections 4.1-4.2):

- outer layer, sparse: a router (``Linear(H -> C)`` over the mean of the trunk's hidden states across
  the prompt's tokens, ``InputEncoder(prompt_spans=True)``) picks one of C task categories per input,
  top-1; with one category there is no router (the paper's DMoERM-w/o-Outer);
- inner layer, dense, per category: k capability experts, each the category's phase-1 base with its own
  LoRA adapter (top layers only) and its own phase-2 score head; the overall reward is an MLP over the
  concatenated final hidden states of the k experts at the scored token,
  ``Linear(k*H -> H), PReLU, Linear(H -> 1)`` (the paper's eq. 6 ends in a sigmoid; its code, which
  this follows, does not: rewards are raw logits like every other kind's).

The overall reward is ``rewards`` (reward ``combined``); each expert's own score (its phase-2 head) is a
head, named by its capability, so the robust aggregates apply to the experts as to any multi-head model;
``categories`` names each input's routed category. Every category uses the same capability list.

On disk::

    rmserve.json      {"kind": "dmoerm", "trunk_layers": 28, "categories": ["chat", ...],
                       "capabilities": ["helpful", ...], "pooling": "last", ...}
    config.json, tokenizer files        (the backbone's)
    router.safetensors                  "weight" (C, H), "bias" (C,); only with two or more categories
    categories/<c>/base/                the category's phase-1 reward model: a standard HF checkpoint
    categories/<c>/experts/<cap>/       a peft adapter on that base (LoRA on the top layers, the phase-2
                                        score head through modules_to_save), peft's own format
    categories/<c>/mlp.safetensors      "0.weight" (H, k*H), "0.bias" (H,), "1.weight" (1,) (PReLU),
                                        "2.weight" (1, H), "2.bias" (1,): nn.Sequential's names

Exactness: expert e of category c is what transformers + peft compute for ``categories/c/base`` with
adapter ``experts/e``; the reward is the MLP on their final hidden states, concatenated in capability
order (``tests/models/test_dmoerm_models.py`` composes it offline, in float32, to 1e-4). Serving runs
one trunk (the layers below ``trunk_layers``, which every category's base shares: phase 1 trains only
the top layers) and, for each category present in a batch, its k expert stacks on that category's rows,
the branched model's path (``rmserve.models.branched``), with LoRA merged into each stack at load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from rmserve.aggregation import AggregationParams, aggregate_rows
from rmserve.batching.prefix import PrefixPlan
from rmserve.config import LoadOptions
from rmserve.models.base import (
    MetaPart,
    ModelInfo,
    module_bytes,
    parameter_count,
    refuse_plan,
    resolve_device,
    resolve_dtype,
)
from rmserve.models.branched import BranchStack, check_split, norm_name, run_stack, run_trunk
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
from rmserve.models.inputs import EncodedInput, InputEncoder
from rmserve.models.lora import ADAPTER_CONFIG, load_merged_classifier
from rmserve.models.moe import decoder_layers
from rmserve.models.pooling import log_pooling, pooling_rule
from rmserve.names import COMBINED, DEFAULT_POOLING, Pooling, RewardName
from rmserve_kernels.heads import HeadOutputs

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
ROUTER_FILE = "router.safetensors"
MLP_FILE = "mlp.safetensors"


class DmoermConfig(BaseModel):
    """``rmserve.json`` of a ``dmoerm`` folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["dmoerm"] = "dmoerm"
    trunk_layers: int = Field(ge=0, description="Layers shared by every category and expert (L - N).")
    categories: tuple[str, ...] = Field(min_length=1, description="Task categories, in router order.")
    capabilities: tuple[str, ...] = Field(
        min_length=1, description="Capability points, one expert each, in MLP input order."
    )
    nominal_head: int = Field(
        0, ge=0, description="The nominal expert of the nominal and tradeoff aggregates."
    )
    reward: RewardName = Field(COMBINED, description="What 'rewards' returns; combined: the MLP's reward.")
    uwo_lambda: float = Field(1.0, ge=0, allow_inf_nan=False)
    tradeoff_lambda: float = Field(0.6, ge=0, le=1, allow_inf_nan=False)
    pooling: Pooling | None = Field(None, description="The token the experts read; unset: hf.")

    @model_validator(mode="after")
    def _names(self) -> DmoermConfig:
        for what, names in (("categories", self.categories), ("capabilities", self.capabilities)):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} must be distinct, got {list(names)}")
            bad = [n for n in names if not re.match(NAME_PATTERN, n)]
            if bad:
                raise ValueError(f"{what} name {bad[0]!r} is not a folder name: use letters, digits, . _ -")
        if self.nominal_head >= len(self.capabilities):
            raise ValueError(
                f"nominal_head {self.nominal_head} is not one of the {len(self.capabilities)} experts"
            )
        return self


def category_dir(path: Path, category: str) -> Path:
    """The folder of one category: its base, experts and MLP."""
    return path / "categories" / category


def expert_dir(path: Path, category: str, capability: str) -> Path:
    """The peft adapter folder of one capability expert of one category."""
    return category_dir(path, category) / "experts" / capability


def read_dmoerm_config(path: Path) -> DmoermConfig:
    """The folder's descriptor, checked against the files it names.

    Raises:
        ValueError: the descriptor is invalid or a file it implies is missing.
    """
    config = read_descriptor(path, DmoermConfig, "dmoerm", "train one with rmserve train-dmoerm")
    needed = [path / "config.json"] + ([path / ROUTER_FILE] if len(config.categories) > 1 else [])
    for category in config.categories:
        needed += [
            category_dir(path, category) / "base" / "config.json",
            category_dir(path, category) / MLP_FILE,
        ]
        needed += [expert_dir(path, category, c) / ADAPTER_CONFIG for c in config.capabilities]
    missing = [str(p.relative_to(path)) for p in needed if not p.is_file()]
    if missing:
        raise ValueError(f"{path} is an incomplete dmoerm folder: {', '.join(missing[:3])} missing.")
    return config


def write_dmoerm_config(path: Path, config: DmoermConfig) -> None:
    """Write the folder's ``rmserve.json``."""
    (path / DESCRIPTOR).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")


def aggregation_mlp(experts: int, hidden: int) -> nn.Sequential:
    """The inner layer's aggregation network: ``Linear(k*H -> H), PReLU, Linear(H -> 1)`` (eq. 6, no sigmoid)."""
    return nn.Sequential(nn.Linear(experts * hidden, hidden), nn.PReLU(), nn.Linear(hidden, 1))


def task_router(hidden: int, categories: int) -> nn.Linear:
    """The outer layer's router: category logits from the prompt's mean trunk state."""
    return nn.Linear(hidden, categories)


def prompt_means(states: torch.Tensor, prompt_tokens: torch.Tensor) -> torch.Tensor:
    """The mean hidden state over each input's first ``prompt_tokens`` positions.

    Args:
        states: (B, T, H) hidden states of a right-padded batch.
        prompt_tokens: (B,) long, each in 1..T.

    Returns:
        (B, H) float32.
    """
    positions = torch.arange(states.shape[1], device=states.device)  # (T,)
    mask = (positions[None, :] < prompt_tokens[:, None]).to(torch.float32)  # (B, T)
    total = torch.einsum("bth,bt->bh", states.float(), mask)  # (B, H)
    return total / prompt_tokens[:, None].to(torch.float32)


def load_module(module: nn.Module, file: Path) -> nn.Module:
    """``module`` (float32) with the weights of ``file``, which must match its names and shapes exactly.

    Raises:
        ValueError: the file's tensors are not the module's.
    """
    state = load_file(file)
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        raise ValueError(f"{file} holds {got}; this model needs {want}.")
    module.load_state_dict({k: v.float() for k, v in state.items()})
    return module.float().eval()


class DmoermRewardModel:
    """A ``dmoerm`` folder loaded for serving (see the module docstring).

    Raises:
        ValueError: the folder is not a valid dmoerm model, quantisation was asked for, the categories'
            bases differ below ``trunk_layers``, or the architecture rescales ``inputs_embeds``.
    """

    kind = "dmoerm"

    def __init__(self, name: str, path: str | Path, options: LoadOptions = LoadOptions()) -> None:
        path = Path(path)
        self.config = config = read_dmoerm_config(path)
        if options.quantize != "none":
            raise ValueError("dmoerm models are served unquantised; use --quantize none.")
        if options.compile:
            check_compilable(name, self.kind, options.quantize)
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        split = config.trunk_layers
        first = AutoModelForSequenceClassification.from_pretrained(
            category_dir(path, config.categories[0]) / "base", dtype=self.dtype
        )
        layers = decoder_layers(first)
        if not 0 <= split < len(layers):
            raise ValueError(
                f"trunk_layers={split} leaves no layer for the experts of a {len(layers)}-layer base."
            )
        base = base_of(first)
        trunk = {k: v for k, v in base.state_dict().items() if not _above(k, split)}
        self.trunk_layers = nn.ModuleList(list(layers)[:split])
        self.stacks: list[list[BranchStack]] = []
        for category in config.categories:
            folder = category_dir(path, category) / "base"
            stacks = []
            for capability in config.capabilities:
                expert = load_merged_classifier(
                    expert_dir(path, category, capability), self.dtype, base=folder
                )
                _check_trunk(base_of(expert), trunk, split, f"categories/{category}/experts/{capability}")
                top = nn.ModuleList(list(decoder_layers(expert))[split:])
                stacks.append(
                    BranchStack(top, getattr(base_of(expert), norm_name(base)), score_head_of(expert))
                )
            self.stacks.append(stacks)
        self._stack_modules = nn.ModuleList([s for stacks in self.stacks for s in stacks])
        base.layers = (
            self.trunk_layers
        )  # the phase-1 top layers and norm are not served: the experts replace them
        setattr(base, norm_name(base), nn.Identity())
        self.base = base.to(self.device).eval()
        self._stack_modules.to(self.device).eval()
        hidden = embeddings_of(base).embedding_dim
        k = len(config.capabilities)
        self.mlps = nn.ModuleList(
            [
                load_module(aggregation_mlp(k, hidden), category_dir(path, c) / MLP_FILE)
                for c in config.categories
            ]
        ).to(self.device)
        self.router: nn.Module | None = None
        if len(config.categories) > 1:
            router = load_module(task_router(hidden, len(config.categories)), path / ROUTER_FILE)
            self.router = router.to(self.device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model_config = config_of(first)
        self.pad_id = pad_token_id(tokenizer, model_config)
        self.pooling = pooling_rule(options.pooling or config.pooling or DEFAULT_POOLING, model_config)
        log_pooling(name, self.pooling, tokenizer)
        self.max_length = resolve_max_length(model_config, tokenizer, options.max_length)
        self.vocab_size = embeddings_of(base).num_embeddings
        self._tokenizer_path = path
        check_split(self.base, self.trunk_layers, self.stacks[0][0], self.vocab_size, "dmoerm")
        small = [*self.mlps] + ([self.router] if self.router is not None else [])
        weights = module_bytes(self.base) + module_bytes(self._stack_modules) + sum(map(module_bytes, small))
        parameters = parameter_count(self.base) + parameter_count(self._stack_modules)
        self.info = ModelInfo(
            name=name,
            kind=self.kind,
            architecture=f"{type(first).__name__}: trunk of {split} layers; {len(config.categories)} categories x "
            f"{k} LoRA experts of {len(layers) - split} layers; MLP over the experts' states",
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            max_length=self.max_length,
            parameters=parameters + sum(map(parameter_count, small)),
            path=str(path),
            weights_bytes=weights,
            pooling=self.pooling.name,
            heads=config.capabilities,
            nominal_head=config.nominal_head,
            reward=config.reward,
            defaults=AggregationParams(config.uwo_lambda, config.tradeoff_lambda),
            categories=config.categories,
        )

    @classmethod
    def meta_parts(cls, path: Path, options: LoadOptions) -> list[MetaPart]:
        """The first category's base on meta (trunk and one stack); the other stacks, MLPs and router as extra."""
        config = read_dmoerm_config(path)
        folder = category_dir(path, config.categories[0]) / "base"
        base_config = AutoConfig.from_pretrained(folder)
        dtype = resolve_dtype(options.dtype, resolve_device(options.device))
        classifier = meta_classifier(base_config, dtype)
        layers = decoder_layers(classifier)
        norm = getattr(base_of(classifier), norm_name(base_of(classifier)))
        stack = nn.ModuleList([*list(layers)[config.trunk_layers :], norm, score_head_of(classifier)])
        stacks = len(config.categories) * len(config.capabilities)
        hidden = int(base_config.hidden_size)
        k = len(config.capabilities)
        small = len(config.categories) * (k * hidden * hidden + 2 * hidden + 2)
        small += (hidden + 1) * len(config.categories) if len(config.categories) > 1 else 0
        extra = (stacks - 1) * parameter_count(stack)
        return [
            MetaPart(
                folder=folder,
                module=classifier,
                max_length=folder_max_length(folder, base_config, options.max_length),
                masked=False,
                extra_bytes=extra * dtype.itemsize + small * 4,
                extra_parameters=extra + small,
            )
        ]

    def new_encoder(self, max_length: int | None = None) -> InputEncoder:
        """A fresh encoder (its own tokenizer instance), marking prompt tokens when there is a router."""
        tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
        limit = self.max_length if max_length is None else min(max_length, self.max_length)
        return InputEncoder(
            tokenizer, max_length=limit, vocab_size=self.vocab_size, text_pairs=False,
            prompt_spans=self.router is not None,
        )  # fmt: skip

    def routes(self, states: torch.Tensor, batch: Sequence[EncodedInput]) -> torch.Tensor:
        """Each input's category, (B,) long: the router's top-1 over the prompt's mean trunk state (0 without one)."""
        if self.router is None:
            return torch.zeros(len(batch), dtype=torch.long, device=states.device)
        prompt = torch.tensor([x.prompt_tokens or len(x) for x in batch], device=states.device)  # (B,)
        return self.router(prompt_means(states, prompt)).argmax(dim=-1)  # (B,)

    @torch.inference_mode()
    def score(
        self,
        batch: Sequence[EncodedInput],
        *,
        uwo_lambda: torch.Tensor,
        tradeoff_lambda: torch.Tensor,
        plan: PrefixPlan | None = None,
    ) -> HeadOutputs:
        """Each expert's score, every aggregate over them, the MLP's reward and the route, on the CPU
        (one right-padded forward: ``plan`` must be None)."""
        refuse_plan(self.info, plan)
        ids, lengths = right_padded(batch, self.pad_id, self.device)
        positions = self.pooling.positions(ids, lengths)  # (B,)
        states = run_trunk(self.base, self.trunk_layers, ids)  # (B, T, H)
        routes = self.routes(states, batch)  # (B,)
        k = len(self.config.capabilities)
        heads = torch.empty(len(batch), k, device=self.device)  # (B, k)
        combined = torch.empty(len(batch), device=self.device)  # (B,)
        for category in routes.unique().tolist():
            rows = (routes == category).nonzero()[:, 0]  # (n,)
            sub = states[rows]  # (n, T, H)
            at = torch.arange(len(rows), device=self.device)
            finals = [
                run_stack(self.base, s, sub)[at, positions[rows]] for s in self.stacks[category]
            ]  # k x (n, H)
            for i, (stack, final) in enumerate(zip(self.stacks[category], finals, strict=True)):
                heads[rows, i] = stack.score(final).float()[:, 0]
            combined[rows] = self.mlps[category](torch.cat(finals, dim=-1).float())[:, 0]  # (n,)
        nominal = torch.full((len(batch),), self.config.nominal_head, device=self.device)
        table = aggregate_rows(heads, nominal, uwo_lambda.to(self.device), tradeoff_lambda.to(self.device))
        return HeadOutputs(heads.cpu(), None, table.cpu(), combined=combined.cpu(), routes=routes.cpu())


def _above(name: str, split: int) -> bool:
    """Whether a base-model state name belongs to the layers from ``split`` up or the final norm."""
    parts = name.split(".")
    if parts[0] == "layers":
        return int(parts[1]) >= split
    return parts[0] in ("norm", "final_layer_norm")


def _check_trunk(base: nn.Module, trunk: dict[str, torch.Tensor], split: int, where: str) -> None:
    """Refuse an expert whose layers below ``split`` differ from the shared trunk's.

    Raises:
        ValueError: a trunk weight differs.
    """
    state = base.state_dict()
    for key, value in trunk.items():
        if not torch.equal(state[key], value):
            raise ValueError(
                f"{where} differs from the first category's base in {key}, below trunk_layers={split}: every "
                "category and expert must share the trunk (train phase 1 and the experts with --top N layers)."
            )
