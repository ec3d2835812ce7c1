"""The contract every model backend fulfils, and the device/dtype choices they share.

Every backend answers a batch with ``HeadOutputs``: k head rewards per input (k = 1 for a dense
model, k members for an ensemble), their sigmas for BRME models, and every robust aggregate of
``rmserve.names.AGGREGATES`` computed with each input's own lambdas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypedDict

import torch

from rmserve.aggregation import AggregationParams
from rmserve.batching.prefix import PrefixPlan
from rmserve.config import LoadOptions
from rmserve.models.inputs import RewardInput
from rmserve.models.quantize import original_numel, quantization_state_tensors
from rmserve.names import AGGREGATES, COMBINED, DTypeName, QuantizeName, RewardName, Truncation
from rmserve_kernels.heads import HeadOutputs

__all__ = ["HeadOutputs"]


class Encoded(Protocol):
    """One tokenised input as a backend's forward takes it; ``len`` is its token count for batching."""

    @property
    def truncated(self) -> bool: ...

    def __len__(self) -> int: ...


class Encoder(Protocol):
    """Tokenises inputs for one backend; one instance per thread (tokenizers are not thread-safe), except
    that encoding ``TokenIds`` alone never touches the tokenizer and is safe from any thread."""

    @property
    def max_length(self) -> int: ...

    def encode_many(
        self, items: Sequence[RewardInput], truncation: Truncation = "left", limit: int | None = None
    ) -> Sequence[Encoded]:
        """Encode inputs in order (at most ``limit`` tokens each if given); an ``InputError`` names the first bad input."""
        ...


@dataclass(frozen=True)
class ModelInfo:
    """What ``/v1/models`` says about a loaded model."""

    name: str
    kind: str
    architecture: str
    dtype: str
    device: str
    max_length: int
    parameters: int
    path: str
    weights_bytes: int = 0
    memory_estimate_bytes: int | None = None  # planned before loading (rmserve.memory); None: not planned
    quantize: QuantizeName = "none"
    pooling: str = "hf"  # which token decoders score (rmserve.models.pooling)
    heads: tuple[str, ...] = ("reward",)
    has_std: bool = False
    nominal_head: int | None = 0
    reward: RewardName = "mean"
    defaults: AggregationParams = field(default_factory=AggregationParams)
    categories: tuple[str, ...] = ()  # dmoerm: the task categories its router picks from
    shares_prefixes: bool = False  # whether ``score`` runs prefix plans (decoder backbones)
    compiled: bool = False  # whether its decoder forwards run through torch.compile (rmserve.models.compile)

    @property
    def has_combined(self) -> bool:
        """Whether the model computes its own ``combined`` reward beside the aggregates (DMoERM)."""
        return self.kind == "dmoerm"

    @property
    def nominal(self) -> str:
        """How the nominal head is chosen, in words."""
        if self.nominal_head is None:
            return "per input, the head with the smallest sigma"
        return self.heads[self.nominal_head]


@dataclass(frozen=True)
class MetaPart:
    """One transformer of a model as its backend would load it, built on the meta device (no weights).

    The memory planner (``rmserve.memory.estimate``) sizes a model from its backend's parts alone: the
    weights of every part add up, and the largest part's activations are the model's peak (the parts of
    one model run one after another).

    Attributes:
        folder: the checkpoint whose safetensors headers must match ``module``.
        module: the module the backend keeps, on meta, in the serving dtype.
        max_length: the token limit per input the backend resolves for this part.
        masked: whether its forward builds an attention mask (encoders; decoders run unmasked).
        keep: Linear modules quantisation leaves in float (heads, MoE routers).
        extra_bytes: weights the backend keeps outside ``module`` (float32 heads).
        extra_parameters: how many weights those are.
        experts: MoE experts per layer (0: a dense FFN).
        top_k: experts active per token.
        moe_triton: whether the MoE layers run the Triton kernels.
        cached_layers: attention layers whose keys and values a prefix group caches (0: those of
            ``module``; a branched model also counts its other branches' top layers).
    """

    folder: Path
    module: torch.nn.Module
    max_length: int
    masked: bool
    keep: tuple[str, ...] = ()
    extra_bytes: int = 0
    extra_parameters: int = 0
    experts: int = 0
    top_k: int = 0
    moe_triton: bool = False
    cached_layers: int = 0

    @property
    def attention_layers(self) -> int:
        """The attention layers a prefix's cache holds (``cached_layers``, else the module's own)."""
        if self.cached_layers:
            return self.cached_layers
        config = getattr(self.module, "config", None)
        text = (
            config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        )
        layers = getattr(text, "num_hidden_layers", 0)
        return layers if isinstance(layers, int) else 0


class ForwardError(RuntimeError):
    """A forward pass failed or produced unusable numbers; fails only its own batch."""


def refuse_plan(info: ModelInfo, plan: PrefixPlan | None) -> None:
    """For backends that cannot share prefixes: a plan is a caller's bug, said as such.

    Raises:
        ValueError: a plan was passed.
    """
    if plan is not None:
        raise ValueError(
            f"{info.name!r} is a {info.kind} model, which does not share prefixes; its ModelInfo says "
            "shares_prefixes=False, so pass no prefix plan."
        )


class RewardModel(Protocol):
    """A loaded reward model: encoders for the tokenisation threads, and a batched forward.

    ``score`` runs on the model's device thread; ``new_encoder`` is called once per tokenisation
    thread, because tokenizers are not thread-safe.
    """

    info: ModelInfo

    def new_encoder(self, max_length: int | None = None) -> Encoder:
        """A fresh encoder bound to this model's tokenizer(s), limited to ``max_length`` tokens if given."""
        ...

    def score(
        self,
        batch: Sequence[Encoded],
        *,
        uwo_lambda: torch.Tensor,
        tradeoff_lambda: torch.Tensor,
        plan: PrefixPlan | None = None,
    ) -> HeadOutputs:
        """Head rewards and aggregates for a batch, in batch order, on the CPU.

        Args:
            batch: inputs from this model's encoders.
            uwo_lambda: each input's UWO lambda, (B,) float32.
            tradeoff_lambda: each input's trade-off lambda, (B,) float32.
            plan: which rows compute a shared prefix once (``rmserve.batching.prefix``); only for models
                whose ``info.shares_prefixes``; None: one right-padded forward.

        Any exception fails the batch.
        """
        ...


class Backend(Protocol):
    """A model kind's backend class: loads a folder for serving, and describes it on meta for planning."""

    def __call__(self, name: str, path: Path, options: LoadOptions) -> RewardModel: ...

    def meta_parts(self, path: Path, options: LoadOptions) -> list[MetaPart]:
        """The modules loading ``path`` with ``options`` would keep, on meta (``MetaPart``)."""
        ...


class Lambdas(TypedDict):
    """``score``'s lambda keyword arguments."""

    uwo_lambda: torch.Tensor
    tradeoff_lambda: torch.Tensor


def lambdas_for(params: AggregationParams, rows: int) -> Lambdas:
    """The same lambdas for ``rows`` inputs, as ``score`` keyword arguments."""
    return {
        "uwo_lambda": torch.full((rows,), params.uwo_lambda),
        "tradeoff_lambda": torch.full((rows,), params.tradeoff_lambda),
    }


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU.

    Raises:
        ValueError: a CUDA device was asked for on a machine without one.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available; use --device cpu.")
    return dev


def resolve_dtype(dtype: DTypeName, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU that supports it and float32 elsewhere.

    On CPU float32 is the exact choice; bfloat16 (weights, or ``--autocast``) is an option whose speed and
    agreement with float32 ``bench/cpu_precision.py`` measures. float16 is never used on CPU.
    """
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    raise ValueError(f"unknown dtype {dtype!r}; use auto, float32 or bfloat16.")


def reward_column(out: HeadOutputs, reward: RewardName) -> torch.Tensor:
    """The rewards a batch's outputs give under ``reward``: that aggregate's column, or ``combined``, (B,).

    Raises:
        ForwardError: ``combined`` was asked of outputs that carry none.
    """
    if reward == COMBINED:
        if out.combined is None:
            raise ForwardError("this model computes no combined reward; ask for an aggregate instead.")
        return out.combined
    return out.aggregates[:, AGGREGATES.index(reward)]


def reward_values(model: RewardModel, batch: Sequence[Encoded]) -> list[float]:
    """The model's reward for a batch, with its default lambdas (offline use and tests)."""
    out = model.score(batch, **lambdas_for(model.info.defaults, len(batch)))
    return reward_column(out, model.info.reward).tolist()


def module_bytes(module: torch.nn.Module) -> int:
    """Memory of a module's parameters and buffers, bitsandbytes' quantisation state included, in bytes."""
    tensors = [*module.parameters(), *module.buffers(), *quantization_state_tensors(module)]
    return sum(t.numel() * t.element_size() for t in tensors)


def parameter_count(module: torch.nn.Module) -> int:
    """How many weights a module has, each quantised weight counted at its original shape."""
    return sum(original_numel(p) for p in module.parameters())
