"""Multi-head reward models on one shared decoder backbone: kinds ``multihead`` and ``brme``.

One forward pass of the backbone gives each input's pooled state h (the final hidden state of the
token the model's pooling rule scores, exactly as dense decoders are read), then k linear heads:

- ``multihead``: head i's reward is ``w_i . h + b_i`` (a cheap ensemble); the nominal head is
  configured (default the first).
- ``brme`` (Bayesian reward model ensemble): head i outputs a mean ``mu_i = w_i . h + b_i`` and a
  standard deviation ``sigma_i = softplus(v_i . h + c_i) + eps``, in float32; the nominal reward is the
  mu of the head with the smallest sigma, chosen per input (the first of equal sigmas).

On disk a model is a folder::

    rmserve.json        {"kind": "brme", "backbone": "../backbone", "heads": ["head0", ...], ...}
    heads.safetensors   weight (k, H), bias (k,)  [+ std_weight (k, H), std_bias (k,) for brme]

``backbone`` is a standard Hugging Face checkpoint folder (a base model, causal LM or
sequence-classification checkpoint, with its tokenizer), absolute or relative to the model folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from rmserve.aggregation import AggregationParams
from rmserve.batching.prefix import PrefixPlan
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
    DecoderBackbone,
    folder_max_length,
    meta_base,
    scored_states,
)
from rmserve.models.descriptor import DESCRIPTOR, read_descriptor
from rmserve.models.inputs import EncodedInput, InputEncoder
from rmserve.models.quantize import head_modules
from rmserve.names import (
    DEFAULT_POOLING,
    AggregateName,
    HeadKind,
    Pooling,
)
from rmserve_kernels.heads import HeadOutputs, select_heads_aggregate
from rmserve_kernels.rmsnorm import fuse_rmsnorm

HEADS_FILE = "heads.safetensors"
DEFAULT_EPS = 1e-6


class HeadModelConfig(BaseModel):
    """``rmserve.json`` of a multi-head or BRME model folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: HeadKind
    backbone: str = Field(
        min_length=1, description="HF checkpoint folder, absolute or relative to this folder."
    )
    heads: tuple[str, ...] = Field(min_length=1, description="Head names, in weight-row order.")
    nominal_head: int | None = Field(
        0, ge=0, description="multihead: the nominal head's index. brme: null (smallest sigma per input)."
    )
    reward: AggregateName | None = Field(
        None, description="The aggregate 'rewards' returns; default tradeoff for brme, mean for multihead."
    )
    uwo_lambda: float = Field(1.0, ge=0, allow_inf_nan=False)
    tradeoff_lambda: float = Field(0.6, ge=0, le=1, allow_inf_nan=False)
    eps: float = Field(DEFAULT_EPS, ge=0, allow_inf_nan=False, description="brme: sigma floor.")
    pooling: Pooling | None = Field(
        None, description="The token the heads read (rmserve.models.pooling); unset: hf."
    )
    training: dict[str, Any] = Field(default_factory=dict, description="How the heads were trained.")

    @model_validator(mode="after")
    def _nominal(self) -> HeadModelConfig:
        check_nominal_head(self.kind, self.nominal_head, len(self.heads))
        return self

    @property
    def default_reward(self) -> AggregateName:
        return default_reward(self.kind, self.reward)


def check_nominal_head(kind: HeadKind, nominal_head: int | None, heads: int) -> None:
    """A brme model's nominal head is per input (null); a multihead model's indexes one of ``heads``.

    Raises:
        ValueError: the rule is broken (the message says how to fix it).
    """
    if kind == "brme" and nominal_head is not None:
        raise ValueError("a brme model picks its nominal head per input by sigma; set nominal_head to null.")
    if kind == "multihead" and nominal_head is None:
        raise ValueError("a multihead model needs nominal_head (an index into heads).")
    if nominal_head is not None and nominal_head >= heads:
        raise ValueError(f"nominal_head={nominal_head} but there are only {heads} heads.")


def default_reward(kind: HeadKind, reward: AggregateName | None) -> AggregateName:
    """The aggregate ``rewards`` returns: the configured one, else tradeoff (brme) or mean (multihead)."""
    return reward or ("tradeoff" if kind == "brme" else "mean")


def read_head_config(path: Path) -> HeadModelConfig:
    """Parse a folder's ``rmserve.json`` as a head model.

    Raises:
        ValueError: the file is missing or invalid (the message says which field).
    """
    return read_descriptor(path, HeadModelConfig, "multihead/brme", "train heads with rmserve train-heads")


def save_head_model(
    out: Path,
    *,
    kind: HeadKind,
    backbone: str,
    weights: dict[str, torch.Tensor],
    head_names: Sequence[str] | None = None,
    nominal_head: int | None = 0,
    reward: AggregateName | None = None,
    params: AggregationParams = AggregationParams(),
    eps: float = DEFAULT_EPS,
    training: dict[str, Any] | None = None,
    pooling: Pooling | None = None,
) -> Path:
    """Write a model folder: ``rmserve.json`` and ``heads.safetensors``.

    Args:
        out: the folder to create (may exist).
        kind: ``multihead`` or ``brme``.
        backbone: the backbone folder as it should be written (absolute, or relative to ``out``).
        weights: ``weight`` (k, H), ``bias`` (k,), and for brme ``std_weight`` (k, H), ``std_bias`` (k,).
        head_names: default ``head0 .. head{k-1}``.
        nominal_head: multihead's nominal head; ignored (null) for brme.
        reward: the aggregate returned as ``rewards``.
        params: default lambdas.
        eps: brme sigma floor.
        training: provenance stored in the descriptor.
        pooling: the rule the heads were trained on (``rmserve.models.pooling``).
    """
    k = weights["weight"].shape[0]
    config = HeadModelConfig(
        kind=kind,
        backbone=backbone,
        heads=tuple(head_names or (f"head{i}" for i in range(k))),
        nominal_head=None if kind == "brme" else nominal_head,
        reward=reward,
        uwo_lambda=params.uwo_lambda,
        tradeoff_lambda=params.tradeoff_lambda,
        eps=eps,
        training=training or {},
        pooling=pooling,
    )
    _check_weights(kind, {n: t for n, t in weights.items()}, len(config.heads), None, out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().float().contiguous().cpu() for n, t in weights.items()}, out / HEADS_FILE)
    (out / DESCRIPTOR).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    return out


def _check_weights(
    kind: HeadKind, weights: dict[str, torch.Tensor], k: int, hidden: int | None, where: Path
) -> None:
    names = {"weight", "bias"} | ({"std_weight", "std_bias"} if kind == "brme" else set())
    if set(weights) != names:
        raise ValueError(
            f"{where / HEADS_FILE} must hold exactly {sorted(names)} for a {kind} model, got {sorted(weights)}."
        )
    for name, tensor in weights.items():
        want = (k, hidden if hidden is not None else tensor.shape[-1]) if name.endswith("weight") else (k,)
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"{where / HEADS_FILE}: {name} has shape {tuple(tensor.shape)}, expected {want} "
                f"({k} heads{'' if hidden is None else f', hidden size {hidden}'})."
            )


class MultiHeadRewardModel:
    """A ``multihead`` or ``brme`` folder loaded for serving.

    Args:
        name: the name requests use to pick this model.
        path: the model folder (``rmserve.json`` + ``heads.safetensors``).
        dtype: ``auto``, ``float32`` or ``bfloat16`` (the backbone's; heads always run in float32).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        max_length: the most tokens per input; defaults to the backbone's own limit.
        kernels: ``auto`` (Triton on CUDA, torch elsewhere), ``triton`` or ``reference``.
        quantize: ``none``, ``int8`` or ``nf4`` for the backbone; the heads stay float32.
        pooling: ``hf`` or ``last``; None: the folder's ``rmserve.json`` declaration, else ``hf``.

    Raises:
        ValueError: the folder, its backbone or its weights are not a valid model.
    """

    def __init__(
        self,
        name: str,
        path: str | Path,
        options: LoadOptions = LoadOptions(),
    ) -> None:
        path = Path(path)
        self.config = config = read_head_config(path)
        self.kind = config.kind
        backbone_path = (path / config.backbone).resolve()
        if not (backbone_path / "config.json").is_file():
            raise ValueError(
                f"{path / DESCRIPTOR} names backbone {config.backbone!r}, but {backbone_path} is not a Hugging "
                "Face model folder (no config.json); fix 'backbone' (absolute, or relative to the model folder)."
            )
        if options.compile:
            check_compilable(name, self.kind, options.quantize)
        self.backbone = DecoderBackbone(
            backbone_path,
            dtype=options.dtype,
            device=options.device,
            max_length=options.max_length,
            quantize=options.quantize,
            pooling=options.pooling or config.pooling or DEFAULT_POOLING,
            name=name,
            max_packed_tokens=options.max_packed_tokens,
            compile=options.compile,
            cpu_row_threads=options.cpu_row_threads,
        )
        self.device = self.backbone.device
        weights = load_file(path / HEADS_FILE) if (path / HEADS_FILE).is_file() else None
        if weights is None:
            raise ValueError(f"{path} has no {HEADS_FILE}; save heads with rmserve train-heads.")
        _check_weights(config.kind, weights, len(config.heads), self.backbone.hidden_size, path)
        # heads stay float32 whatever the backbone dtype: they are tiny and sigma is computed in float32
        self.weights = {n: t.float().to(self.device) for n, t in weights.items()}
        self._heads_aggregate = select_heads_aggregate(self.device, options.kernels)
        fuse_rmsnorm(self.backbone.base, options.kernels)  # logs how many norms run the Triton kernel
        head_parameters = sum(t.numel() for t in weights.values())
        self.info = ModelInfo(
            name=name,
            kind=config.kind,
            architecture=f"{type(self.backbone.base).__name__} + {len(config.heads)} {config.kind} heads",
            dtype=str(self.backbone.dtype).removeprefix("torch."),
            device=str(self.device),
            max_length=self.backbone.max_length,
            parameters=parameter_count(self.backbone.base) + head_parameters,
            path=str(path),
            weights_bytes=module_bytes(self.backbone.base) + 4 * head_parameters,
            quantize=self.backbone.quantize,
            pooling=self.backbone.pooling.name,
            shares_prefixes=True,
            compiled=self.backbone.compiled is not None,
            heads=config.heads,
            has_std=config.kind == "brme",
            nominal_head=config.nominal_head,
            reward=config.default_reward,
            defaults=AggregationParams(config.uwo_lambda, config.tradeoff_lambda),
        )

    @classmethod
    def meta_parts(cls, path: Path, options: LoadOptions) -> list[MetaPart]:
        """The backbone's base model on meta, and the float32 heads beside it."""
        backbone = (path / read_head_config(path).backbone).resolve()
        config = AutoConfig.from_pretrained(backbone)
        base = meta_base(config, resolve_dtype(options.dtype, resolve_device(options.device)))
        with safe_open(path / HEADS_FILE, framework="pt") as f:
            head_elements = sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118
        return [
            MetaPart(
                folder=backbone,
                module=base,
                max_length=folder_max_length(backbone, config, options.max_length),
                masked=False,
                keep=tuple(head_modules(config)),
                extra_bytes=4 * head_elements,
                extra_parameters=head_elements,
            )
        ]

    def new_encoder(self, max_length: int | None = None) -> InputEncoder:
        """A fresh encoder with its own tokenizer instance (tokenizers are not thread-safe)."""
        return self.backbone.new_encoder(max_length)

    @torch.inference_mode()
    def score(
        self,
        batch: Sequence[EncodedInput],
        *,
        uwo_lambda: torch.Tensor,
        tradeoff_lambda: torch.Tensor,
        plan: PrefixPlan | None = None,
    ) -> HeadOutputs:
        """Head rewards (and sigmas for brme) with every aggregate, in batch order, on the CPU; ``plan``:
        which rows share a prefix."""
        hidden, positions = scored_states(
            self.backbone.base,
            batch,
            plan,
            pooling=self.backbone.pooling,
            pad_id=self.backbone.pad_id,
            device=self.device,
            packing=self.backbone.packing,
            compiled=self.backbone.compiled,
            threads=self.backbone.threads,
        )  # (B, T, H), (B,)
        out = self._heads_aggregate(
            hidden,
            self.weights["weight"],
            self.weights["bias"],
            self.weights.get("std_weight"),
            self.weights.get("std_bias"),
            nominal_head=self.config.nominal_head,
            uwo_lambda=uwo_lambda.to(self.device),
            tradeoff_lambda=tradeoff_lambda.to(self.device),
            eps=self.config.eps,
            positions=positions,
        )
        return HeadOutputs(
            out.heads.cpu(), None if out.head_std is None else out.head_std.cpu(), out.aggregates.cpu()
        )
