"""The memory of one served model, estimated from its folder before anything is loaded.

Each model is estimated alone on its device (``estimate_model`` gives a ``ModelEstimate``); whether
the models of a device fit it together is ``rmserve.memory.plan``'s.

- **weights**: the backend's own module is built on the ``meta`` device from the folder's config (no
  memory, no weights read), in the serving dtype the backends resolve (``resolve_dtype``: bfloat16 on a
  GPU, float32 on the CPU), so what each backend keeps is counted as ``module_bytes`` counts it:
  dense and moe keep the whole sequence classifier, multihead/brme the base model (``AutoModel`` has no
  ``lm_head``) plus float32 heads, an ensemble every member; tied weights count once, non-persistent
  buffers (rotary frequencies) count. The checkpoint's safetensors headers are read to check that the
  config describes the weights (a tensor of another shape is an error, not a guess). With ``quantize``,
  the ``nn.Linear`` layers ``rmserve.models.quantize`` replaces (all but the reward head, MoE routers
  and the model's ``_keep_in_fp32_modules``) take 1 byte per element plus a float32 scale per row
  (int8), or half a byte plus a float32 absmax per 64 elements and a 16-entry code table (nf4);
  embeddings, norms and heads keep the serving dtype. Exact: equal to the loaded model's
  ``module_bytes`` in every mode (the Triton MoE kernels read the experts in place: no copy).
- **activations**: the peak of one forward of the largest batch the limits allow (no autograd), with
  N = min(max_batch_tokens, max_batch_size x T) padded tokens in sequences of T = the model's token
  limit. Bytes, e the element size of the serving dtype, H the hidden size, I the MLP width,
  A = heads x head_dim, K = kv_heads x head_dim::

      N x max(                                   the widest phase of a layer, 3-4 (N, H) hidden
          (3H + max(4A + 2K, 2A + 5K)) e,        states alive besides: q, k, v and the rotary
          (4H + mI) e,                           temporaries of q or k; the MLP (m = 3 SwiGLU, 2
          3He + 8H,                              plain); a norm's float32 copy and square;
          [(3H + A + 2K [+ 2A]) e + T heads (e + 4)])   eager attention only: the scores
      + N x T x (e eager, 1 masked SDPA, else 0)  the (B, 1, T, T) mask
      + 8 MiB                                    batch-independent buffers (measured 1.5-4.5 MiB)
      + the MoE and quantised-matmul workspaces   (``_moe_workspace``, ``_quantized_workspace``)
      + with prefix sharing: N x (2K e + T)      a suffix forward's keys and values concatenated
                             + L x T x 2K e      to its prefix's, and its boolean mask; the prefix's
                                                 cache, L attention layers (``prefix_cache_layers``)
      + with packing: 5 P^2                      a packed row's (1, 1, P, P) block mask, boolean and
                                                 SDPA's float copy, P = min(max_packed_tokens, N)

  Prefix sharing (``rmserve.batching.prefix``) cuts suffix batches so that rows x (prefix + suffix)
  stays within N, so the widest suffix forward is bounded like a whole-input one; the cache of one
  prefix (at most T tokens, batch of one) is held for all of its group's suffix forwards.

  SDPA (what transformers gives the backends by default, on CPU and CUDA alike, whenever the
  architecture supports it; read off the meta model) never materialises the (T, T) scores: decoders run
  without a mask (``is_causal``, native GQA), so only eager attention pays T^2. No vocabulary logits:
  decoders run their base model. Measured on the CPU (peak RSS increase of a forward in a fresh
  process): the formula is 0.4% to 11% above the peak for Llama, GPT-NeoX and BERT at 8192 tokens in
  float32, bfloat16, SDPA and eager; more for small batches (the fixed 8 MiB) and for MoE layers whose
  routing is balanced (docs/architecture.md, "Memory planning"; tests/unit/test_memory.py keeps it
  above the peak and within 20%).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from rmserve.config import LoadOptions
from rmserve.models.base import module_bytes, resolve_device, resolve_dtype
from rmserve.models.decoder import config_of
from rmserve.models.loader import backend_for
from rmserve.models.packing import packing_for
from rmserve.models.quantize import NF4_BLOCKSIZE
from rmserve.names import QuantizeName

log = logging.getLogger(__package__)  # rmserve.memory: one logger for the estimates and the plan

NF4_CODES = 16  # entries of the nf4 code table each layer keeps
FORWARD_FIXED_BYTES = 8 * 2**20  # per-forward buffers independent of the batch: measured 1.5-4.5 MiB on CPU
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def _count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def format_bytes(size: int) -> str:
    """``size`` in the largest binary unit under it, e.g. ``1.50 GiB``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def device_key(device: str) -> str:
    """The device a model's memory comes from: ``cuda`` is the current CUDA device (``cuda:0``)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(dev)


_ONE_FORWARD_KINDS = ("ensemble", "dmoerm")  # backends that never share prefixes (ModelInfo.shares_prefixes)


@dataclass(frozen=True)
class ForwardShape:
    """The largest forward the batch limits allow: ``tokens`` padded tokens, sequences of ``length``."""

    tokens: int
    length: int

    @classmethod
    def of(cls, *, max_batch_tokens: int, max_batch_size: int, length: int) -> ForwardShape:
        length = min(length, max_batch_tokens)
        return cls(tokens=min(max_batch_tokens, max_batch_size * length), length=length)


@dataclass(frozen=True)
class ModelEstimate:
    """One model's planned memory on its device, in bytes.

    Attributes:
        name: the served model's name.
        device: where it lives (``cpu``, ``cuda:0``, ...).
        weights_bytes: parameters and buffers (``module_bytes``), with quantisation statistics.
        activation_bytes: the peak of one forward of its largest batch.
        detail: how it was sized, for the log and the error message.
    """

    name: str
    device: str
    weights_bytes: int
    activation_bytes: int
    detail: str = ""

    @property
    def total_bytes(self) -> int:
        """Weights plus the forward's peak: the model alone on its device."""
        return self.weights_bytes + self.activation_bytes

    def describe(self) -> str:
        return (
            f"{self.name} on {self.device}: weights {format_bytes(self.weights_bytes)} + activations "
            f"{format_bytes(self.activation_bytes)} = {format_bytes(self.total_bytes)} ({self.detail})"
        )


@dataclass(frozen=True)
class Transformer:
    """What the activation formula reads from an architecture (see the module docstring)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    gated: bool
    attention: str
    masked: bool
    window: int | None = None
    experts: int = 0
    top_k: int = 0
    moe_triton: bool = False
    largest_linear: tuple[int, int] = (0, 0)  # (out, in) features of the widest quantised Linear

    @classmethod
    def of(
        cls, model: nn.Module, *, masked: bool, experts: int = 0, top_k: int = 0, moe_triton: bool = False
    ) -> Transformer:
        """The figures of a model built on meta (its config, and its Linear layers for the MLP kind).

        Raises:
            ValueError: the config lacks a size the formula needs.
        """
        config = config_of(model)
        needed = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
        missing = [n for n in needed if not isinstance(getattr(config, n, None), int)]
        if missing:
            raise ValueError(
                f"{type(model).__name__}'s config has no {', '.join(missing)}, which the memory planner needs "
                "to size its activations; this architecture cannot be planned."
            )
        hidden, intermediate = config.hidden_size, config.intermediate_size
        heads = config.num_attention_heads
        mlp = [
            m
            for name, m in model.named_modules()
            if type(m) is nn.Linear and ".experts." not in name
            and (m.in_features, m.out_features) == (hidden, intermediate)
        ]  # fmt: skip
        window = (
            getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        )
        linears = [(m.out_features, m.in_features) for m in model.modules() if type(m) is nn.Linear]
        return cls(
            hidden=hidden,
            intermediate=intermediate,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            gated=len(mlp) >= 2 * config.num_hidden_layers,
            attention=str(getattr(config, "_attn_implementation", None) or "eager"),
            masked=masked,
            window=window if isinstance(window, int) else None,
            experts=experts,
            top_k=top_k,
            moe_triton=moe_triton,
            largest_linear=max(linears, key=lambda s: s[0] * s[1], default=(0, 0)),
        )


def activation_bytes(
    arch: Transformer,
    shape: ForwardShape,
    dtype: torch.dtype,
    quantize: QuantizeName = "none",
    *,
    prefix_cache_layers: int = 0,
    packed_tokens: int = 0,
) -> int:
    """The peak activation memory of one forward (the module docstring's formula).

    Args:
        arch: the architecture's figures.
        shape: the largest batch (padded tokens, sequence length).
        dtype: the dtype activations are computed in.
        quantize: the weights' quantisation (adds its matmul workspace).
        prefix_cache_layers: with prefix sharing, the attention layers whose prefix keys and values are
            cached (every layer the model runs, each branch's included); 0: no sharing.
        packed_tokens: the most tokens of a packed forward (``rmserve.models.packing``); it adds the
            (1, 1, T, T) block mask, boolean and as SDPA's float copy; 0: the model never packs.
    """
    e = torch.empty((), dtype=dtype).element_size()
    n, t = shape.tokens, shape.length
    h, i = arch.hidden, arch.intermediate
    a, k = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    eager = arch.attention == "eager"
    masked = arch.masked or (arch.window is not None and t > arch.window)
    # bytes per token of each phase of a layer; 3-4 (N, H) hidden states stay alive throughout (the
    # embeddings, the layer's input, its residual and normed input)
    phases = [
        (3 * h + max(4 * a + 2 * k, 2 * a + 5 * k)) * e,  # q, k, v and the rotary temporaries of q or of k
        (4 * h + (3 if arch.gated else 2) * i) * e,  # the MLP: gate, act(gate), up and their product
        3 * h * e + 8 * h,  # a norm's float32 copy and square
    ]
    if eager:  # the scores, scaled, masked and softmaxed in float32; k and v repeated for GQA
        phases.append((3 * h + a + 2 * k + (2 * a if k < a else 0)) * e + t * arch.heads * (e + 4))
    mask = t * e if eager else t if masked else 0  # (B, 1, T, T): float for eager, boolean for SDPA
    total = n * (max(phases) + mask) + FORWARD_FIXED_BYTES
    packed = min(packed_tokens, n)
    total += packed * packed * 5  # a packed row's block mask: bool, then float32 in SDPA
    if prefix_cache_layers:
        total += n * (2 * k * e + t) + prefix_cache_layers * t * 2 * k * e
    return total + _moe_workspace(arch, n, e) + _quantized_workspace(arch, e, quantize)


def _moe_workspace(arch: Transformer, tokens: int, e: int) -> int:
    """An MoE layer's buffers beyond a dense FFN's, with every token routed to one expert (the worst case).

    Reference path: a gathered copy of the expert's tokens, the float32 accumulator and its
    out-of-place ``index_add`` copy, and the routing (probabilities, picks, their sort). Triton path:
    one float32 row of the FFN width and of the hidden size per (token, slot) and for the shared expert.
    """
    if not arch.experts:
        return 0
    routing = (arch.experts - 1) * 8 + (arch.top_k - 1) * 32
    if arch.moe_triton:
        return tokens * (arch.top_k * 4 * (arch.intermediate + arch.hidden) + routing)
    return tokens * (arch.hidden * e + 8 * arch.hidden + routing)


def _quantized_workspace(arch: Transformer, e: int, quantize: QuantizeName) -> int:
    """The widest quantised matmul's temporary: int8 and nf4 both dequantise the layer's weight to the
    compute dtype for the product (``rmserve.models.quantize``)."""
    out_features, in_features = arch.largest_linear
    return 0 if quantize == "none" else out_features * in_features * e


def quantized_bytes(module: nn.Module, quantize: QuantizeName, keep: Sequence[str] = ()) -> int:
    """``module_bytes`` of ``module`` once its Linear layers are quantised as ``rmserve.models.quantize`` does.

    Every ``nn.Linear`` (exact type) is replaced except the modules in ``keep`` (the reward head, MoE
    routers) and the model's ``_keep_in_fp32_modules`` (which transformers also skips). A replaced
    weight of (out, in) takes ``out x in`` bytes plus ``out`` float32 row scales (int8), or
    ``ceil(out x in / 2)`` bytes plus a float32 absmax per 64 elements and the 16-entry float32 code
    table (nf4); its bias keeps its dtype.

    Args:
        module: the model, built on meta in its serving dtype.
        quantize: ``none``, ``int8`` or ``nf4``.
        keep: module names (or suffixes at a module boundary) left unquantised.
    """
    total = module_bytes(module)
    if quantize == "none":
        return total
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = [*keep, *(getattr(module, "_keep_in_fp32_modules", None) or ())]
    for name, layer in module.named_modules():
        if type(layer) is not nn.Linear or not should_convert_module(name, skip):
            continue
        numel = layer.weight.numel()
        if quantize == "int8":
            packed = numel + 4 * layer.out_features
        else:
            packed = (numel + 1) // 2 + 4 * -(-numel // NF4_BLOCKSIZE) + 4 * NF4_CODES
        total += packed - numel * layer.weight.element_size()
    return total


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """The tensor shapes of a folder's safetensors checkpoint, from the headers only (None: no safetensors).

    Reads ``model.safetensors``, or every shard named by ``model.safetensors.index.json``.
    """
    if (folder / _INDEX).is_file():
        files = sorted(set(json.loads((folder / _INDEX).read_text())["weight_map"].values()))
    elif (folder / _SINGLE).is_file():
        files = [_SINGLE]
    else:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(folder / file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def check_checkpoint(folder: Path, model: nn.Module) -> None:
    """Check that the checkpoint holds the meta model's tensors at its shapes (headers only).

    Names are matched as transformers matches them: as is, or with the base model prefix added or
    removed. Tensors the checkpoint lacks are initialised by transformers (a new score head): logged.

    Raises:
        ValueError: a tensor has another shape in the checkpoint (the config does not describe it).
    """
    shapes = checkpoint_shapes(folder)
    if shapes is None:
        log.warning("%s has no safetensors checkpoint; its estimate is from config.json alone.", folder)
        return
    prefix = getattr(model, "base_model_prefix", "") or ""
    missing = []
    for name, tensor in model.state_dict().items():
        candidates = [name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")] if prefix else [name]
        found = next((shapes[c] for c in candidates if c in shapes), None)
        if found is None:
            missing.append(name)
        elif found != tuple(tensor.shape):
            raise ValueError(
                f"{folder}: the checkpoint holds {name} as {found}, but config.json describes {tuple(tensor.shape)}; "
                "the folder's config does not describe its weights (a pre-quantised checkpoint cannot be planned: "
                "serve a full-precision one with --quantize)."
            )
    if missing:
        log.info(
            "%s: %d tensors are not in the checkpoint and will be initialised: %s",
            folder,
            len(missing),
            missing[:4],
        )


@dataclass(frozen=True)
class _Part:
    """One transformer of a model: its weights and its activation peak."""

    weights: int
    activations: int
    parameters: int


def _packed_tokens(module: torch.nn.Module, options: LoadOptions, device: torch.device) -> int:
    """The most tokens a decoder part runs packed (0: never); counted for every kind with such a part,
    including those that always pad (a few MB at most)."""
    packing = packing_for(getattr(module, "config", None), options.max_packed_tokens, device)
    return 0 if packing is None else packing.max_tokens


def estimate_model(
    name: str,
    path: Path,
    options: LoadOptions = LoadOptions(),
    *,
    max_batch_tokens: int,
    max_batch_size: int,
    prefix_sharing: bool = False,
) -> ModelEstimate:
    """Estimate a model folder's memory without loading its weights.

    The folder's backend describes what it would keep, on meta (``meta_parts``); each part is checked
    against its checkpoint's headers and sized: weights as quantised, activations of its largest batch.

    Args:
        name: the served model's name.
        path: the model folder (demos must already be built).
        options: as the model will be loaded; the scored token (pooling) does not change the memory.
        max_batch_tokens, max_batch_size: the model's batch limits.
        prefix_sharing: whether the model will share prefixes (counts their caches, for backends whose
            parts run decoders).

    Raises:
        ValueError: the folder is not a model of a known kind, a CUDA device is asked for without one,
            the config does not describe the checkpoint, or the architecture cannot be sized.
    """
    kind, backend = backend_for(name, path, options.kind)
    dev = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, dev)
    parts = backend.meta_parts(path, options)
    shares = prefix_sharing and kind not in _ONE_FORWARD_KINDS and not any(p.masked for p in parts)
    sized = []
    for part in parts:
        shape = ForwardShape.of(
            max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size, length=part.max_length
        )
        check_checkpoint(part.folder, part.module)
        arch = Transformer.of(
            part.module,
            masked=part.masked,
            experts=part.experts,
            top_k=part.top_k,
            moe_triton=part.moe_triton,
        )
        sized.append(
            _Part(
                # compiled (--compile): the graph's frozen copy of the weights beside the eager module
                weights=quantized_bytes(part.module, options.quantize, part.keep)
                * (2 if options.compile else 1)
                + part.extra_bytes,
                activations=activation_bytes(
                    arch,
                    shape,
                    dtype,
                    options.quantize,
                    prefix_cache_layers=part.attention_layers if shares else 0,
                    packed_tokens=0 if part.masked else _packed_tokens(part.module, options, dev),
                ),
                parameters=sum(p.numel() for p in part.module.parameters()) + part.extra_parameters,
            )
        )
    quant = "" if options.quantize == "none" else f" {options.quantize}"
    batch = (
        f"{shape.tokens} tokens x {shape.length}"
        if len(parts) == 1
        else f"{max_batch_tokens} tokens per member"
    )
    return ModelEstimate(
        name=name,
        device=device_key(str(dev)),
        weights_bytes=sum(p.weights for p in sized),
        activation_bytes=max(p.activations for p in sized),  # the parts of a model run one after another
        detail=f"{kind}, {_count(sum(p.parameters for p in sized))} parameters, "
        f"{str(dtype).removeprefix('torch.')}{quant}, batch {batch}",
    )
