"""Weight quantisation through bitsandbytes: what ``--quantize none|int8|nf4`` loads, and what it leaves alone.

- ``int8``: each linear weight is stored as int8 with one float32 scale per output row (bitsandbytes'
  ``Int8Params`` in a ``Linear8bitLt``, the layout LLM.int8() loads). Each forward dequantises the weight
  to the model dtype and multiplies in that dtype (``int8_weight_forward``): the activations are never
  quantised. LLM.int8()'s own forward also quantises every activation row to int8 below an outlier
  threshold; on the demo model that kept the preferred response of 87.9% of the held-out HH pairs
  against 97.8% for weight-only int8, and it ran at half the float32 speed on CPU, where bitsandbytes
  quantises activations through a float16 copy (weight-only int8 runs at the float32 speed there;
  ``bench/quantize.py``, ``docs/benchmarks.md``).
- ``nf4``: 4-bit NormalFloat (``bitsandbytes.nn.Linear4bit``). Weights are packed two per byte with one
  float32 absmax per block of 64 (no nested quantisation of the absmax); each forward dequantises them to
  the compute dtype, which is the model dtype: float32 on CPU (never float16), bfloat16 on a GPU.

Both modes therefore compute exactly the float model on round-tripped weights (tested to float32
rounding). Only the ``nn.Linear`` layers of the transformer are quantised. Embeddings, norms, the reward
head (every module of a sequence classifier outside its base model: ``score`` for decoders,
``classifier`` for BERT-like encoders) and rmserve's own heads (multihead/brme weights, ensemble
calibration, MoE routers) keep their dtype, so the head kernel reads a plain float ``nn.Linear``.
bitsandbytes >= 0.50 runs both modes on CPU as well as on CUDA.

Hugging Face checkpoints load through transformers' ``BitsAndBytesConfig`` (``pretrained_kwargs``), then
``finish_quantized`` gives their int8 layers the weight-only forward; the ``moe`` kind, whose model
rmserve builds itself, gets the same bitsandbytes layers with the same settings from ``quantize_linears``.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

from rmserve.names import QuantizeName

QUANTIZE_MODES: tuple[QuantizeName, ...] = ("none", "int8", "nf4")
BITSANDBYTES_MIN_VERSION = (0, 50)
INSTALL_COMMAND = "pip install 'bitsandbytes>=0.50'"
NF4_BLOCKSIZE = 64  # bitsandbytes' default block of the nf4 absmax


def check_quantize(quantize: str) -> QuantizeName:
    """``quantize`` if it names a mode.

    Raises:
        ValueError: an unknown mode.
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize {quantize!r}; use one of {', '.join(QUANTIZE_MODES)}.")
    return quantize


def require_bitsandbytes(quantize: str) -> ModuleType:
    """The ``bitsandbytes`` module, checked to be recent enough for ``quantize`` on CPU and GPU.

    Raises:
        ValueError: bitsandbytes is not installed, or older than 0.50 (the message has the pip command).
    """
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError(
            f"quantize={quantize!r} needs bitsandbytes, which is not installed; install it with "
            f"{INSTALL_COMMAND} (or pip install 'rmserve[quantize]'), or serve with --quantize none."
        ) from None
    version = tuple(int(part) for part in bitsandbytes.__version__.split(".")[:2] if part.isdigit())
    if version < BITSANDBYTES_MIN_VERSION:
        raise ValueError(
            f"quantize={quantize!r} needs bitsandbytes >= 0.50 (CPU support), found {bitsandbytes.__version__}; "
            f"upgrade with {INSTALL_COMMAND}."
        )
    return bitsandbytes


def _check_compute_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Quantised layers compute in the model dtype: float32 or bfloat16, never float16 on CPU."""
    if dtype not in (torch.float32, torch.bfloat16):
        where = "on CPU float16 runs about 100x slower than float32" if device.type == "cpu" else ""
        raise ValueError(
            f"quantised layers compute in the model dtype, here {dtype}{'; ' + where if where else ''}; "
            "use --dtype float32 (or bfloat16 on a GPU)."
        )


def bnb_config(
    quantize: QuantizeName, *, dtype: torch.dtype, device: torch.device, keep: Sequence[str]
) -> BitsAndBytesConfig | None:
    """transformers' ``BitsAndBytesConfig`` for ``quantize`` (``None`` for ``none``).

    Args:
        quantize: ``none``, ``int8`` or ``nf4``.
        dtype: the model dtype, also nf4's compute dtype.
        device: where the model runs.
        keep: modules left unquantised (names, or name suffixes at a module boundary).

    Raises:
        ValueError: an unknown mode, bitsandbytes missing, or a dtype quantised layers cannot compute in.
    """
    if check_quantize(quantize) == "none":
        return None
    require_bitsandbytes(quantize)
    _check_compute_dtype(dtype, device)
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(keep))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=False,
        llm_int8_skip_modules=list(keep),
    )


def pretrained_kwargs(
    quantize: QuantizeName, *, dtype: torch.dtype, device: torch.device, config: Any
) -> dict[str, Any]:
    """Keyword arguments of ``from_pretrained`` for a model of ``dtype`` on ``device``, quantised as asked.

    A quantised model is placed on ``device`` by ``device_map`` (bitsandbytes quantises each weight as it
    lands there): do not move it afterwards. The reward head of ``config``'s sequence classifier
    (``head_modules``) stays unquantised.

    Args:
        quantize: ``none``, ``int8`` or ``nf4``.
        dtype: the model dtype, also nf4's compute dtype.
        device: where the model runs.
        config: the checkpoint's ``PretrainedConfig``.

    Raises:
        ValueError: as ``bnb_config``.
    """
    if check_quantize(quantize) == "none":
        return {"dtype": dtype}
    quantization = bnb_config(quantize, dtype=dtype, device=device, keep=head_modules(config))
    return {"dtype": dtype, "quantization_config": quantization, "device_map": {"": str(device)}}


def head_modules(config: Any) -> tuple[str, ...]:
    """The modules of ``config``'s sequence classifier outside its base model (its reward head), built on meta."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        probe = AutoModelForSequenceClassification.from_config(config)
    return tuple(name for name, _ in probe.named_children() if name != probe.base_model_prefix)


def _kept(name: str, keep: Sequence[str]) -> bool:
    return any(name == k or name.startswith(f"{k}.") or name.endswith(f".{k}") for k in keep)


def quantize_linears(
    model: nn.Module,
    quantize: QuantizeName,
    *,
    dtype: torch.dtype,
    device: torch.device,
    keep: Sequence[str],
) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` by its bitsandbytes layer, quantised on ``device``.

    The layers and settings are those ``bnb_config`` gives transformers (int8: ``Linear8bitLt`` with the
    weight-only forward of ``finish_quantized``; nf4: ``Linear4bit``, blocks of 64, compute in ``dtype``);
    biases keep their dtype.

    Args:
        model: a float model, already on ``device`` (only the replaced layers are placed here).
        quantize: ``none`` (nothing changes), ``int8`` or ``nf4``.
        dtype: the model dtype, nf4's compute dtype.
        device: where the quantised layers live.
        keep: modules left unquantised (names, or name suffixes at a module boundary).

    Returns:
        How many layers were replaced.

    Raises:
        ValueError: as ``bnb_config``.
    """
    if check_quantize(quantize) == "none":
        return 0
    bnb = require_bitsandbytes(quantize)
    _check_compute_dtype(dtype, device)
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or _kept(name, keep):
            continue
        weight = module.weight.detach().cpu()  # (out, in); bitsandbytes quantises it on its move to device
        has_bias = module.bias is not None
        if quantize == "int8":
            layer = bnb.nn.Linear8bitLt(
                module.in_features, module.out_features, has_bias,
                has_fp16_weights=False, device="meta",
            )  # fmt: skip
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(
                module.in_features, module.out_features, has_bias,
                compute_dtype=dtype, compress_statistics=False, quant_type="nf4", device="meta",
            )  # fmt: skip
            layer.weight = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                blocksize=NF4_BLOCKSIZE,
                compress_statistics=False,
                quant_type="nf4",
                module=layer,
            )
        if has_bias:
            layer.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        model.set_submodule(name, layer.to(device).train(module.training))  # the replaced layer's mode
        replaced += 1
    finish_quantized(model, quantize)
    return replaced


def finish_quantized(model: nn.Module, quantize: QuantizeName) -> int:
    """Make every quantised layer of ``model`` compute one way on every machine; returns how many layers.

    int8 layers get the weight-only forward (``int8_weight_forward``). nf4 layers keep bitsandbytes' own
    forward (it dequantises to the model dtype), with its CPU repacking turned off: on CPUs with AVX512-BF16
    bitsandbytes repacks nf4 weights with bfloat16 block scales at the first forward, which changes the
    numbers by machine and fails outright on layers narrower than one 64-weight block. Called on every
    model bitsandbytes quantised (by transformers or ``quantize_linears``); ``none`` changes nothing.
    """
    if quantize == "none":
        return 0
    bnb = require_bitsandbytes(quantize)
    count = 0
    for module in model.modules():
        if quantize == "int8" and isinstance(module, bnb.nn.Linear8bitLt):
            module.forward = types.MethodType(int8_weight_forward, module)
            count += 1
        elif quantize == "nf4" and isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward before it repacks
            count += 1
    return count


def int8_weight_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + b`` with ``W`` the layer's int8 weight dequantised to ``x``'s dtype: ``W_int8 * scale / 127``.

    The same product bitsandbytes computes for a ``Linear8bitLt`` in training on CPU; here at inference
    and on every device. The dequantised weight is a temporary of the layer's size in the model dtype.
    """
    int8: Any = layer  # a bitsandbytes Linear8bitLt (bitsandbytes ships no type information)
    weight = int8.weight  # Int8Params: (out, in) int8
    scales = weight.SCB if weight.SCB is not None else int8.state.SCB  # (out,) float32: each row's absmax
    dequantised = weight.data.to(x.dtype).mul_(scales.unsqueeze(1).mul(1.0 / 127.0))  # (out, in)
    bias = int8.bias if int8.bias is None or int8.bias.dtype == x.dtype else int8.bias.to(x.dtype)
    return nn.functional.linear(x, dequantised, bias)  # (..., out)


def original_numel(parameter: torch.Tensor) -> int:
    """How many weights a parameter holds: an nf4 weight counts as its unpacked shape."""
    state = getattr(parameter, "quant_state", None)
    return math.prod(state.shape) if state is not None else parameter.numel()


def quantization_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """What bitsandbytes layers keep besides their parameters and buffers, each tensor once.

    int8: each layer's row scales (``SCB``; the int8 weight itself is the parameter). nf4: each layer's
    block absmax and code table, plus the nested statistics when the absmax is itself quantised.
    """
    found: dict[int, torch.Tensor] = {}
    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        candidates: list[Any] = []
        if weight is not None and hasattr(
            weight, "SCB"
        ):  # Int8Params (bitsandbytes' own forward moves the scales to layer.state)
            candidates.append(weight.SCB if weight.SCB is not None else getattr(layer.state, "SCB", None))
        state = getattr(weight, "quant_state", None)  # Params4bit
        if state is not None:
            candidates += [state.absmax, state.code, state.offset]
            if state.state2 is not None:
                candidates += [state.state2.absmax, state.state2.code]
        for tensor in candidates:
            if isinstance(tensor, torch.Tensor):
                found.setdefault(id(tensor), tensor)
    return list(found.values())
