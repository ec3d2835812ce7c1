"""Upcycled shared-expert MoE reward models (UMM-RM, kind ``moe``): the layer, the folder, its serving.

``rmserve.training.upcycle`` turns chosen decoder layers' FFN into an ``UpcycledMoE``: expert 0 is the shared
expert (always on), experts 1..N-1 are normal experts routed top-(K-1) by a new router (a linear map
without bias), and every expert starts as a copy of the dense FFN. Routing weights per token
(UMM-RM eq. 6-7), as ``rmserve_kernels.routing`` defines them:

- affinities ``s = softmax(router(x))`` over the N-1 normal experts (float32);
- the top-(K-1) normal experts by affinity (ties: the lower index);
- for the selected experts, ``routing: xft`` (the default; UMM-RM eq. 7 as XFT's code computes it):
  ``g_i = softmax over the selected (s)_i * s_max``; ``routing: renorm``: ``g_i = s_i / sum_{j selected}
  s_j * s_max`` (the selected probabilities renormalised; folders written before the choice existed say
  ``renormalised-top-k``, read as ``renorm``). With K - 1 = 1 both give ``s_max``;
- ``g_shared = 1 - s_max``, so the weights sum to 1.

Because the weights sum to 1 and every expert is the dense FFN, the upcycled model scores exactly as
the dense one until training moves the experts apart (tested to 1e-5 in float32).

On disk a ``moe`` folder is the dense model's ``config.json`` and tokenizer, ``model.safetensors``
holding the whole state dict (MoE layers as ``...mlp.shared.*``, ``...mlp.experts.{i}.*``,
``...mlp.router.weight``), and ``rmserve.json``::

    {"kind": "moe", "experts": 4, "top_k": 2, "layers": [28, 29], "routing": "xft", ...}

It is not loadable by vanilla transformers: ``rmserve merge`` turns it back into a dense folder that is.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from rmserve.config import LoadOptions
from rmserve.models.base import MetaPart, resolve_device
from rmserve.models.decoder import base_of, config_of
from rmserve.models.dense import DenseRewardModel
from rmserve.models.descriptor import read_descriptor
from rmserve.models.quantize import check_quantize, head_modules, quantize_linears
from rmserve.names import Pooling
from rmserve_kernels.moe_layer import REFERENCE_KERNELS, TRITON_KERNELS, MoeKernels, select_moe_kernels
from rmserve_kernels.routing import ROUTING_RULES, RoutingRule, route_reference

WEIGHTS = "model.safetensors"
LEGACY_ROUTING = {"renormalised-top-k": "renorm"}
"""Routing names of older folders and the rule they meant."""


class MoeConfig(BaseModel):
    """``rmserve.json`` of a ``moe`` folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["moe"] = "moe"
    experts: int = Field(ge=2, description="N: the shared expert plus N - 1 normal experts.")
    top_k: int = Field(ge=2, description="K: experts active per token (the shared one + K - 1 routed).")
    layers: tuple[int, ...] = Field(min_length=1, description="Decoder layers whose FFN is an MoE.")
    routing: RoutingRule = Field(
        "xft", description="How the selected affinities become weights: xft (UMM-RM eq. 7) or renorm."
    )
    upcycled_from: str | None = None
    pooling: Pooling | None = Field(
        None, description="The token the score head reads (rmserve.models.pooling); unset: hf."
    )
    training: dict[str, Any] = Field(default_factory=dict)

    @field_validator("routing", mode="before")
    @classmethod
    def _legacy_routing(cls, value: object) -> object:
        if isinstance(value, str) and value in LEGACY_ROUTING:
            return LEGACY_ROUTING[value]
        if isinstance(value, str) and value not in ROUTING_RULES:
            raise ValueError(f"routing {value!r} is unknown; use one of {', '.join(ROUTING_RULES)}.")
        return value


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a sequence-classification model (``base.layers``).

    Raises:
        ValueError: the architecture keeps its layers elsewhere, or they have no ``mlp``.
    """
    layers = getattr(base_of(model), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "mlp") for layer in layers):
        raise ValueError(
            f"{type(model).__name__} has no decoder layers with an 'mlp' at {model.base_model_prefix}.layers; "
            "upcycling supports Llama, Qwen2, Mistral and GPT-NeoX style decoders."
        )
    return layers


class UpcycledMoE(nn.Module):
    """A shared-expert MoE in place of a dense FFN (see the module docstring for the routing).

    Args:
        ffn: the dense FFN; it becomes the shared expert, and each normal expert starts as a copy.
        experts: N, the shared expert included.
        top_k: K, the shared expert included.
        rule: the routing rule, ``xft`` or ``renorm``.
        generator: seeds the router's initial weights (normal, std 0.02).
    """

    def __init__(
        self,
        ffn: nn.Module,
        *,
        experts: int,
        top_k: int,
        rule: RoutingRule = "xft",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not 2 <= top_k <= experts:
            raise ValueError(
                f"top_k must lie in [2, experts={experts}] (the shared expert + at least one), got {top_k}."
            )
        hidden = _hidden_size(ffn)
        self.top_k = top_k
        self.rule: RoutingRule = rule
        self.shared = ffn
        self.experts = nn.ModuleList(copy.deepcopy(ffn) for _ in range(experts - 1))
        reference = next(ffn.parameters())
        self.router = nn.Linear(
            hidden, experts - 1, bias=False, dtype=reference.dtype, device=reference.device
        )
        with torch.no_grad():
            init = torch.randn(experts - 1, hidden, generator=generator) * 0.02  # (N-1, H)
            self.router.weight.copy_(init.to(self.router.weight))
        self.last_router_probs: torch.Tensor | None = None  # (T, N-1) of the latest forward, for the aux loss
        self.last_expert_index: torch.Tensor | None = None  # (T, K-1)
        self.kernels: MoeKernels = REFERENCE_KERNELS
        self._stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def use_kernels(self, kernels: MoeKernels) -> None:
        """Serve with ``kernels`` (the Triton set fuses routing and grouped experts, SwiGLU FFNs only).

        Raises:
            ValueError: Triton kernels for an FFN that is not a bias-free SwiGLU.
        """
        if kernels is not REFERENCE_KERNELS and not _is_swiglu(self.shared):
            raise ValueError(
                f"the MoE kernels compute SwiGLU experts; {type(self.shared).__name__} is not one: use --kernels reference."
            )
        self.kernels = kernels
        self._stacked = self._stack_experts() if kernels is not REFERENCE_KERNELS else None

    def _stack_experts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The normal experts' weights stacked per projection, the experts' own weights then views of them.

        The Triton kernels read one (N-1, ...) tensor per projection. Each expert's ``weight`` becomes a
        parameter over its slice of that tensor, so the experts take their memory once, and an in-place
        update of either is seen by both.
        """
        stacked = []
        with torch.no_grad():
            for name in ("gate_proj", "up_proj", "down_proj"):
                layers = [getattr(e, name) for e in self.experts]
                weights = torch.stack([layer.weight for layer in layers])  # (N-1, F, H) or (N-1, H, F)
                for index, layer in enumerate(layers):
                    layer.weight = nn.Parameter(weights[index], requires_grad=layer.weight.requires_grad)
                stacked.append(weights)
        return stacked[0], stacked[1], stacked[2]

    def _stacked_source(self) -> torch.Tensor:
        """The first normal expert's gate weight: a view of the stacked tensor while it is current."""
        gate = getattr(self.experts[0], "gate_proj", None)
        if not isinstance(gate, nn.Linear):
            raise TypeError(f"{type(self.experts[0]).__name__} has no gate_proj Linear (not a SwiGLU FFN).")
        return gate.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])  # (T, H)
        if self.kernels is not REFERENCE_KERNELS and not self.training:
            first = self._stacked_source()
            if self._stacked is None or self._stacked[0].data_ptr() != first.data_ptr():
                self._stacked = self._stack_experts()  # the module was moved or cast since: stack again
            gate, up, down = (getattr(self.shared, n).weight for n in ("gate_proj", "up_proj", "down_proj"))
            shared = (gate, up, down)
            out = self.kernels.moe_layer(
                x, self.router.weight, shared, *self._stacked, self.top_k - 1, self.rule
            )
            return out.reshape(shape)
        routing = route_reference(x, self.router.weight, self.top_k - 1, self.rule)
        if self.training:
            self.last_router_probs = torch.softmax(self.router(x).float(), dim=-1)  # (T, N-1)
            self.last_expert_index = routing.expert_index
        out = self.shared(x).float() * routing.shared_weight[:, None]  # (T, H)
        flat_expert = routing.expert_index.reshape(-1)  # (T*(K-1),)
        flat_weight = routing.expert_weight.reshape(-1)  # (T*(K-1),)
        flat_token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k - 1)  # (T*(K-1),)
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=len(self.experts)).tolist()
        start = 0
        for index, count in enumerate(counts):  # one call per expert on its contiguous group of tokens
            if count:
                rows = order[start : start + count]
                tokens = flat_token[rows]
                y = self.experts[index](x[tokens]).float() * flat_weight[rows, None]  # (count, H)
                out = out.index_add(0, tokens, y)
            start += count
        return out.to(hidden.dtype).reshape(shape)


def _module(value: object) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"expected a module, got {type(value).__name__}.")
    return value


def _is_swiglu(ffn: nn.Module) -> bool:
    projections = [getattr(ffn, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    linear = all(isinstance(m, nn.Linear) and m.bias is None for m in projections)
    act = getattr(ffn, "act_fn", None)
    probe = torch.linspace(-4, 4, 9)
    return linear and callable(act) and torch.allclose(act(probe), torch.nn.functional.silu(probe))


def _hidden_size(ffn: nn.Module) -> int:
    for name in ("gate_proj", "up_proj", "dense_h_to_4h", "fc1", "c_fc"):
        layer = getattr(ffn, name, None)
        if isinstance(layer, nn.Linear):
            return layer.in_features
    raise ValueError(f"cannot find the input projection of {type(ffn).__name__} to size the router.")


def replace_ffns(
    model: nn.Module,
    layers: Sequence[int],
    *,
    experts: int,
    top_k: int,
    seed: int,
    rule: RoutingRule = "xft",
) -> None:
    """Replace the FFN of each listed decoder layer by an ``UpcycledMoE`` (in place)."""
    stack = decoder_layers(model)
    generator = torch.Generator().manual_seed(seed)
    for index in layers:
        if not 0 <= index < len(stack):
            raise ValueError(f"layer {index} does not exist; the model has layers 0..{len(stack) - 1}.")
        layer = stack[index]
        layer.mlp = UpcycledMoE(
            _module(layer.mlp), experts=experts, top_k=top_k, rule=rule, generator=generator
        )


def moe_layers(model: nn.Module) -> list[UpcycledMoE]:
    """The model's MoE layers, in layer order."""
    return [m for m in model.modules() if isinstance(m, UpcycledMoE)]


def read_moe_config(path: Path) -> MoeConfig:
    return read_descriptor(path, MoeConfig, "moe", "make one with rmserve upcycle")


def load_moe_classifier(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The ``moe`` folder's model: the dense architecture with its MoE layers, weights loaded strictly.

    Raises:
        ValueError: the descriptor, the config or the weights do not match.
    """
    config = read_moe_config(path)
    dense_config = AutoConfig.from_pretrained(path)
    # built on the CPU, not on meta: non-persistent buffers (rotary frequencies) are not in the weights
    model = AutoModelForSequenceClassification.from_config(dense_config, dtype=dtype)
    replace_ffns(
        model, config.layers, experts=config.experts, top_k=config.top_k, seed=0, rule=config.routing
    )
    state = load_file(path / WEIGHTS)
    missing = set(model.state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(
            f"{path / WEIGHTS} does not match its rmserve.json: missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}; the folder must come from rmserve upcycle or rmserve train."
        )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model.eval()


class MoERewardModel(DenseRewardModel):
    """A ``moe`` folder served like a dense decoder: same padding, pooling, head and aggregation.

    Quantised (``int8``/``nf4``), every linear layer but the routers and the score head becomes a
    bitsandbytes layer (``quantize_linears``), experts included; the MoE layers then run the reference
    path, since the Triton MoE kernels read float expert weights (``kernels="triton"`` is refused).
    """

    kind = "moe"

    def __init__(
        self,
        name: str,
        path: str | Path,
        options: LoadOptions = LoadOptions(),
    ) -> None:
        if check_quantize(options.quantize) != "none" and options.kernels == "triton":
            raise ValueError(
                f"the Triton MoE kernels read float expert weights, so a {options.quantize}-quantised moe model runs "
                "its experts as bitsandbytes layers on the reference path; use --kernels auto or reference, "
                "or --quantize none."
            )
        self.moe_config = read_moe_config(Path(path))
        super().__init__(name, path, options)
        layers = self.moe_config.layers
        span = (
            f"layer {layers[0]}" if len(layers) == 1 else f"{len(layers)} layers ({layers[0]}..{layers[-1]})"
        )
        chosen = (
            REFERENCE_KERNELS if self.quantize != "none" else select_moe_kernels(self.device, options.kernels)
        )
        for layer in moe_layers(self.model):
            layer.use_kernels(chosen)
        moe = f"MoE ({self.moe_config.experts} experts, top-{self.moe_config.top_k}) in {span}"
        self.info = dataclasses.replace(self.info, architecture=f"{self.info.architecture} + {moe}")

    @classmethod
    def meta_parts(cls, path: Path, options: LoadOptions) -> list[MetaPart]:
        """The dense classifier with its MoE layers, on meta; routers stay float, as loading keeps them."""
        moe = read_moe_config(path)
        (part,) = super().meta_parts(path, options)
        replace_ffns(part.module, moe.layers, experts=moe.experts, top_k=moe.top_k, seed=0)
        device = resolve_device(options.device)
        # quantised experts run the reference path
        triton = options.quantize == "none" and select_moe_kernels(device, options.kernels) is TRITON_KERNELS
        return [
            dataclasses.replace(
                part, keep=(*part.keep, "router"), experts=moe.experts, top_k=moe.top_k, moe_triton=triton
            )
        ]

    def _load_classifier(self, path: Path, config: PretrainedConfig) -> nn.Module:
        model: nn.Module = load_moe_classifier(path, self.dtype)
        if self.quantize == "none":
            return model
        model.to(self.device)
        keep = (*head_modules(config_of(model)), "router")  # routers are read as float weights
        quantize_linears(model, self.quantize, dtype=self.dtype, device=self.device, keep=keep)
        return model
