"""Upcycled shared-expert MoE reward models (UMM-RM, kind ``moe``): the layer, upcycling, the folder.

``upcycle`` turns chosen decoder layers' FFN into an ``UpcycledMoE``: expert 0 is the shared
expert (always on), experts 1..N-1 are normal experts routed top-(K-1) by a new router (a linear map
without bias), and every expert starts as a copy of the dense FFN. Routing weights per token
(UMM-RM eq. 6-7), as ``rmserve_kernels.moe`` defines them:

- affinities ``s = softmax(router(x))`` over the N-1 normal experts (float32);
- the top-(K-1) normal experts by affinity (ties: the lower index);
- ``g_i = s_i / sum_{j selected} s_j * s_max`` for the selected experts: the selected
  probabilities renormalised, as the public XFT code does (the paper writes ``Softmax(s_i) * s_max``;
  with K - 1 = 1 both give ``s_max``), and ``g_shared = 1 - s_max``, so the weights sum to 1.

Because the weights sum to 1 and every expert is the dense FFN, the upcycled model scores exactly as
the dense one until training moves the experts apart (tested to 1e-5 in float32).

On disk a ``moe`` folder is the dense model's ``config.json`` and tokenizer, ``model.safetensors``
holding the whole state dict (MoE layers as ``...mlp.shared.*``, ``...mlp.experts.{i}.*``,
``...mlp.router.weight``), and ``rmserve.json``::

    {"kind": "moe", "experts": 4, "top_k": 2, "layers": [28, 29], "routing": "renormalised-top-k", ...}

It is not loadable by vanilla transformers: ``rmserve merge`` turns it back into a dense folder that is.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig

from rmserve.models.base import DTypeName, KernelsName
from rmserve.models.dense import DenseRewardModel
from rmserve.models.descriptor import DESCRIPTOR, read_descriptor
from rmserve.models.pooling import Pooling, declared_pooling
from rmserve.models.quantize import QuantizeName, check_quantize, head_modules, quantize_linears
from rmserve_kernels.moe import REFERENCE_KERNELS, MoeKernels, route_reference, select_moe_kernels

WEIGHTS = "model.safetensors"
ROUTING = "renormalised-top-k"


class MoeConfig(BaseModel):
    """``rmserve.json`` of a ``moe`` folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["moe"] = "moe"
    experts: int = Field(ge=2, description="N: the shared expert plus N - 1 normal experts.")
    top_k: int = Field(ge=2, description="K: experts active per token (the shared one + K - 1 routed).")
    layers: tuple[int, ...] = Field(min_length=1, description="Decoder layers whose FFN is an MoE.")
    routing: Literal["renormalised-top-k"] = ROUTING
    upcycled_from: str | None = None
    pooling: Pooling | None = Field(
        None, description="The token the score head reads (rmserve.models.pooling); unset: hf."
    )
    training: dict[str, Any] = Field(default_factory=dict)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a sequence-classification model (``base.layers``).

    Raises:
        ValueError: the architecture keeps its layers elsewhere, or they have no ``mlp``.
    """
    base = getattr(model, model.base_model_prefix)
    layers = getattr(base, "layers", None)
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
        generator: seeds the router's initial weights (normal, std 0.02).
    """

    def __init__(
        self, ffn: nn.Module, *, experts: int, top_k: int, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if not 2 <= top_k <= experts:
            raise ValueError(
                f"top_k must lie in [2, experts={experts}] (the shared expert + at least one), got {top_k}."
            )
        hidden = _hidden_size(ffn)
        self.top_k = top_k
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

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])  # (T, H)
        if self.kernels is not REFERENCE_KERNELS and not self.training:
            first = self.experts[0].gate_proj.weight
            if self._stacked is None or self._stacked[0].data_ptr() != first.data_ptr():
                self._stacked = self._stack_experts()  # the module was moved or cast since: stack again
            shared = tuple(getattr(self.shared, n).weight for n in ("gate_proj", "up_proj", "down_proj"))
            out = self.kernels.moe_layer(x, self.router.weight, shared, *self._stacked, self.top_k - 1)  # type: ignore[arg-type]
            return out.reshape(shape)
        routing = route_reference(x, self.router.weight, self.top_k - 1)
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


def replace_ffns(model: nn.Module, layers: Sequence[int], *, experts: int, top_k: int, seed: int) -> None:
    """Replace the FFN of each listed decoder layer by an ``UpcycledMoE`` (in place)."""
    stack = decoder_layers(model)
    generator = torch.Generator().manual_seed(seed)
    for index in layers:
        if not 0 <= index < len(stack):
            raise ValueError(f"layer {index} does not exist; the model has layers 0..{len(stack) - 1}.")
        stack[index].mlp = UpcycledMoE(stack[index].mlp, experts=experts, top_k=top_k, generator=generator)


def moe_layers(model: nn.Module) -> list[UpcycledMoE]:
    """The model's MoE layers, in layer order."""
    return [m for m in model.modules() if isinstance(m, UpcycledMoE)]


def resolve_layers(total: int, layers: Sequence[int] | None, last: int | None) -> tuple[int, ...]:
    """The layers to upcycle: an explicit list, the ``last`` n, or all."""
    if layers and last:
        raise ValueError("give either the layers to upcycle or how many of the last ones, not both.")
    if last is not None:
        if not 1 <= last <= total:
            raise ValueError(f"last must lie in [1, {total}], got {last}.")
        return tuple(range(total - last, total))
    chosen = tuple(sorted(set(layers))) if layers else tuple(range(total))
    bad = [i for i in chosen if not 0 <= i < total]
    if bad:
        raise ValueError(f"layer {bad[0]} does not exist; the model has layers 0..{total - 1}.")
    return chosen


def save_moe(model: nn.Module, tokenizer: Any, out: Path, config: MoeConfig) -> Path:
    """Write a ``moe`` folder: dense ``config.json``, tokenizer, full state dict, ``rmserve.json``."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, out / WEIGHTS, metadata={"format": "pt"})
    (out / DESCRIPTOR).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    return out


def upcycle(
    dense: Path, out: Path, *, experts: int, top_k: int, layers: Sequence[int] | None = None,
    last: int | None = None, seed: int = 0,
) -> MoeConfig:  # fmt: skip
    """Upcycle a dense reward-model folder into a ``moe`` folder (every expert a copy of the FFN).

    Raises:
        ValueError: the folder is not a one-label decoder classifier, or the options are invalid.
    """
    model = AutoModelForSequenceClassification.from_pretrained(dense, dtype=torch.float32)
    if model.config.num_labels != 1:
        raise ValueError(f"{dense} has num_labels={model.config.num_labels}; a reward model has exactly one.")
    chosen = resolve_layers(len(decoder_layers(model)), layers, last)
    replace_ffns(model, chosen, experts=experts, top_k=top_k, seed=seed)
    config = MoeConfig(
        experts=experts,
        top_k=top_k,
        layers=chosen,
        upcycled_from=str(dense.resolve()),
        pooling=declared_pooling(dense),  # it scores exactly as the dense model, on the same token
    )
    save_moe(model, AutoTokenizer.from_pretrained(dense), out, config)
    return config


def read_moe_config(path: Path) -> MoeConfig:
    return read_descriptor(path, MoeConfig, "moe", "make one with rmserve upcycle")


def load_moe_classifier(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The ``moe`` folder's model: the dense architecture with its MoE layers, weights loaded strictly.

    Raises:
        ValueError: the descriptor, the config or the weights do not match.
    """
    config = read_moe_config(path)
    dense_config = AutoConfig.from_pretrained(path)
    # built on the CPU, not on meta: non-persistent buffers (rotary frequencies) are not in the weights
    model = AutoModelForSequenceClassification.from_config(dense_config, dtype=dtype)
    replace_ffns(model, config.layers, experts=config.experts, top_k=config.top_k, seed=0)
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
        *,
        dtype: DTypeName = "auto",
        device: str = "auto",
        max_length: int | None = None,
        kernels: KernelsName = "auto",
        quantize: QuantizeName = "none",
        pooling: Pooling | None = None,
    ) -> None:
        if check_quantize(quantize) != "none" and kernels == "triton":
            raise ValueError(
                f"the Triton MoE kernels read float expert weights, so a {quantize}-quantised moe model runs "
                "its experts as bitsandbytes layers on the reference path; use --kernels auto or reference, "
                "or --quantize none."
            )
        self.moe_config = read_moe_config(Path(path))
        super().__init__(
            name,
            path,
            dtype=dtype,
            device=device,
            max_length=max_length,
            kernels=kernels,
            quantize=quantize,
            pooling=pooling,
        )
        layers = self.moe_config.layers
        span = (
            f"layer {layers[0]}" if len(layers) == 1 else f"{len(layers)} layers ({layers[0]}..{layers[-1]})"
        )
        chosen = REFERENCE_KERNELS if self.quantize != "none" else select_moe_kernels(self.device, kernels)
        for layer in moe_layers(self.model):
            layer.use_kernels(chosen)
        moe = f"MoE ({self.moe_config.experts} experts, top-{self.moe_config.top_k}) in {span}"
        self.info = dataclasses.replace(self.info, architecture=f"{self.info.architecture} + {moe}")

    def _load_classifier(self, path: Path, config: PretrainedConfig) -> nn.Module:
        model = load_moe_classifier(path, self.dtype)
        if self.quantize == "none":
            return model
        model = model.to(self.device)
        keep = (*head_modules(model.config), "router")  # routers are read as float weights
        quantize_linears(model, self.quantize, dtype=self.dtype, device=self.device, keep=keep)
        return model


@contextmanager
def frozen_prefix(model: nn.Module, first_trained_layer: int) -> Iterator[None]:
    """Within the block, the base model starts at ``first_trained_layer`` from ``inputs_embeds``.

    Training that leaves layers ``0 .. first_trained_layer - 1`` frozen feeds the cached hidden states
    entering that layer as ``inputs_embeds``: the model's own forward then runs only the later layers
    (its rotary embeddings and causal mask depend only on positions).
    """
    stack = decoder_layers(model)
    base = getattr(model, model.base_model_prefix)
    types = getattr(model.config, "layer_types", None)
    if types and len(set(types)) > 1:
        raise ValueError("prefix caching needs one attention type for every layer; train without it.")
    saved = base.layers
    base.layers = nn.ModuleList(list(stack)[first_trained_layer:])
    try:
        yield
    finally:
        base.layers = saved


@torch.no_grad()
def prefix_states(model: nn.Module, ids: torch.Tensor, first_trained_layer: int) -> torch.Tensor:
    """The hidden states entering ``first_trained_layer`` (the final norm when it is the layer count).

    Returns:
        (B, T, H), for right-padded ids without a mask.
    """
    captured: list[torch.Tensor] = []
    stack = decoder_layers(model)

    def grab(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    base = getattr(model, model.base_model_prefix)
    target = stack[first_trained_layer] if first_trained_layer < len(stack) else final_norm(base)
    handle = target.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        getattr(model, model.base_model_prefix)(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def final_norm(base: nn.Module) -> nn.Module:
    """The base model's final norm (``norm`` or ``final_layer_norm``)."""
    for name in ("norm", "final_layer_norm"):
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(base).__name__} has no final norm named norm or final_layer_norm.")


class _Stop(Exception):
    """Ends a forward once the wanted hidden states are captured."""
