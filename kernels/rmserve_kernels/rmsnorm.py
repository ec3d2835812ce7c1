"""RMSNorm as Hugging Face decoders compute it: a fused Triton forward, its torch reference, and the swap.

This module owns the RMSNorm forward of transformers' decoders (5.23) in the two forms they use:

- ``llama`` (``LlamaRMSNorm`` and the same code in Qwen2, Qwen3, Mistral and 130-odd others): statistics
  in float32, ``normed = x32 * rsqrt(mean(x32 ** 2) + variance_epsilon)``, *cast back to the input dtype*,
  then ``weight * normed``; the output dtype is that product's (the input dtype when the weight's agrees);
- ``gemma`` (``GemmaRMSNorm``, Gemma2/Gemma3, Qwen3-Next...): the same statistics with ``eps``, a weight
  stored as an offset from one, the multiply in float32 and the cast last:
  ``(normed32 * (1 + weight32)).to(x.dtype)``.

``rmsnorm_reference`` is that code in plain torch (bit for bit the modules' output); ``rmsnorm_triton``
computes it in one kernel launch that reads each row once and writes it once (a whole row in registers,
BLOCK_R rows per program), where transformers' eager forward launches six (float32) to eight (bfloat16:
two casts more) elementwise and reduction kernels per norm, each a round trip through memory. RMSNorm is
memory-bound, so that traffic is its cost; results match the reference to 1e-5 in float32 (summation order
differs) and to one rounding of the output dtype in bfloat16.

``fuse_rmsnorm`` swaps the kernel into a loaded model once, at load time, under the policy of
``rmserve_kernels.selection`` (Triton on CUDA under ``auto``, nothing elsewhere): it replaces the forward
of each module whose class name ends in ``RMSNorm`` and whose forward is, bytecode for bytecode, one of the
two forms above (the copies of transformers' code kept here; a module whose code differs, for instance one
casting after the weight multiply, is left on its own forward and named in a logged warning). The fused
residual add + RMSNorm would need each decoder layer's forward rewritten, so it is not done here.

Launch configurations (see ``rmserve_kernels.tuning`` for the rules every kernel shares). On CUDA the
kernel is autotuned, keyed on H and a power-of-two bucket of the rows R (1024..16384; the dtypes are added
by the autotuner), over 8 tiles: one row per program with 4, 8, 16 or 32 warps (wider rows want more
threads: 4 warps hold a 2K-value row at 16 values per thread, 32 warps a 64K one at 64), 2 rows with 8
warps, 4 rows with 4 or 8, and 16 rows with 4 (narrow rows, e.g. per-head q/k norms of 64 to 256).
Tiles of several rows above 16K values are pruned at launch; one row fits every launch. There is no loop
to pipeline (num_stages 1) and no tl.dot, so no tile side has a minimum. The tiles suit A100 and H100 alike
(1024-thread programs, 64K registers per SM); timing picks the warps for each hidden size. Under the
interpreter: one tile, 4 rows. As for every kernel here, ``TRITON_INTERPRET`` must be exported before the
process starts (see ``rmserve_kernels.heads``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import types
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast

import torch
from torch import nn

from rmserve.names import KernelsName
from rmserve_kernels.selection import require_triton, use_triton
from rmserve_kernels.tuning import Tile, TuningSpace, autotuned, size_bucket

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is all there is
    triton = None
    tl = None

__all__ = [
    "MAX_HIDDEN",
    "RMSNormStyle",
    "fuse_rmsnorm",
    "rmsnorm_reference",
    "rmsnorm_style",
    "rmsnorm_triton",
]

log = logging.getLogger(__name__)

RMSNormStyle = Literal["llama", "gemma"]

MAX_HIDDEN = 65536
"""The widest row the kernel takes: a program holds whole rows in registers (up to 64 float32 per thread)."""

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_TILE = 16384  # the most values (BLOCK_R * BLOCK_H) a program of several rows holds in registers


# --- the two forms, as transformers 5.23 writes them --------------------------------------------------
# Verbatim copies of the forward code (no docstrings: a docstring would change the bytecode compared).
# ``rmsnorm_style`` matches a module only if its forward compiles to the same bytecode, names and constants,
# so a transformers release that changed the math would be left alone rather than computed the old way.


def _llama_forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _gemma_norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def _gemma_forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)


def _same_code(function: Any, model: Callable[..., Any]) -> bool:
    """Whether ``function`` is a Python function compiling to ``model``'s bytecode, names and constants."""
    code = getattr(function, "__code__", None)
    if code is None:
        return False
    want = model.__code__
    return (code.co_code, code.co_consts, code.co_names) == (want.co_code, want.co_consts, want.co_names)


# --- validation and the reference ---------------------------------------------------------------------


def _validate(x: torch.Tensor, weight: torch.Tensor, eps: float, style: str) -> None:
    """Raise a ValueError naming the first argument that does not fit the others."""
    if style not in ("llama", "gemma"):
        raise ValueError(f"style must be 'llama' or 'gemma', got {style!r}.")
    if weight.ndim != 1 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 1-D floating tensor (one scale per hidden unit), got shape {tuple(weight.shape)} "
            f"and dtype {weight.dtype}."
        )
    if x.ndim < 1 or not x.is_floating_point() or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"x must be a floating (..., {weight.shape[0]}) tensor (the last dimension is the one normalised, "
            f"as wide as weight), got shape {tuple(x.shape)} and dtype {x.dtype}."
        )
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number, got {eps!r}.")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}; move it with .to(x.device).")


def rmsnorm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, style: RMSNormStyle = "llama"
) -> torch.Tensor:
    """RMSNorm over the last dimension, exactly as transformers' modules compute it (the definition).

    Args:
        x: activations, (..., H), any float dtype.
        weight: the scales, (H,); for ``gemma`` the offsets from one.
        eps: ``variance_epsilon`` (llama) or ``eps`` (gemma), added to the mean square.
        style: ``llama`` (cast to x's dtype, then weight multiply) or ``gemma`` (``1 + weight``, multiply in
            float32, cast last).

    Returns:
        (..., H): llama in the promotion of x's and weight's dtypes, gemma in x's dtype.

    Raises:
        ValueError: a style that is neither, shapes that do not fit, a non-finite eps, or devices that differ.
    """
    _validate(x, weight, eps, style)
    if style == "llama":
        input_dtype = x.dtype
        hidden = x.to(torch.float32)  # (..., H)
        variance = hidden.pow(2).mean(-1, keepdim=True)  # (..., 1)
        hidden = hidden * torch.rsqrt(variance + eps)  # (..., H)
        return weight * hidden.to(input_dtype)  # (..., H)
    hidden = x.float()  # (..., H)
    output = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)  # (..., H)
    output = output * (1.0 + weight.float())  # (..., H)
    return output.type_as(x)


# --- the kernel --------------------------------------------------------------------------------------


def _tile_fits(launch: Mapping[str, int]) -> bool:
    """Whether a candidate suits a launch: one row always does; several only within ``_MAX_TILE`` values."""
    return launch["BLOCK_R"] == 1 or launch["BLOCK_R"] * launch["BLOCK_H"] <= _MAX_TILE


_TUNING = TuningSpace(
    candidates=(
        Tile({"BLOCK_R": 1}, num_warps=4, num_stages=1),  # rows up to 2K values: 4 to 16 per thread
        Tile({"BLOCK_R": 1}, num_warps=8, num_stages=1),
        Tile({"BLOCK_R": 1}, num_warps=16, num_stages=1),
        Tile({"BLOCK_R": 1}, num_warps=32, num_stages=1),  # rows of 16K to 64K values
        Tile({"BLOCK_R": 2}, num_warps=8, num_stages=1),
        Tile({"BLOCK_R": 4}, num_warps=4, num_stages=1),
        Tile({"BLOCK_R": 4}, num_warps=8, num_stages=1),
        Tile({"BLOCK_R": 16}, num_warps=4, num_stages=1),  # narrow rows (per-head norms of 64 to 256)
    ),
    interpreter=Tile({"BLOCK_R": 4}),
    dot_sides=(),
    fits=_tile_fits,
)
"""The RMSNorm kernel's launch configurations (see the module docstring for why these)."""

_R_BUCKETS = (1024, 16384)  # the autotune key's row bucket: next power of two of R, clamped to this range

if triton is not None:

    @triton.jit
    def _rmsnorm_kernel(
        x_ptr,  # (R, H) rows stride_xr apart, unit column stride
        weight_ptr,  # (H,) contiguous
        out_ptr,  # out (R, H) contiguous
        R,
        H,
        stride_xr,
        eps,
        R_BUCKET,  # unused by the program: the autotuner's key, R's power-of-two bucket
        CAST_BEFORE_WEIGHT: tl.constexpr,
        ONE_PLUS_WEIGHT: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_R: tl.constexpr,  # tuned
    ):
        """BLOCK_R rows: one load, float32 mean square and rsqrt, the weight multiply, one store.

        Columns >= H are padding (BLOCK_H is a power of two), loaded as 0 so they add nothing to the sum.
        CAST_BEFORE_WEIGHT rounds the normalised row to the input dtype before the multiply (llama);
        ONE_PLUS_WEIGHT scales by 1 + weight (gemma). The product is computed in float32 and rounded once
        to the output dtype, as torch computes a bfloat16 product.
        """
        pid = tl.program_id(0)
        rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (BLOCK_R,) R * H may pass 2**31
        cols = tl.arange(0, BLOCK_H)  # (BLOCK_H,)
        row_ok = rows < R  # (BLOCK_R,)
        col_ok = cols < H  # (BLOCK_H,)
        mask = row_ok[:, None] & col_ok[None, :]  # (BLOCK_R, BLOCK_H)
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)  # (BLOCK_R, BLOCK_H)
        variance = tl.sum(x * x, axis=1) / H  # (BLOCK_R,)
        normed = x * tl.rsqrt(variance + eps)[:, None]  # (BLOCK_R, BLOCK_H)
        if CAST_BEFORE_WEIGHT:
            normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)  # (BLOCK_R, BLOCK_H)
        w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_H,)
        if ONE_PLUS_WEIGHT:
            w = 1.0 + w  # (BLOCK_H,)
        y = normed * w[None, :]  # (BLOCK_R, BLOCK_H)
        tl.store(out_ptr + rows[:, None] * H + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    _rmsnorm_tuned = autotuned(_rmsnorm_kernel, _TUNING, key=("H", "R_BUCKET"))


# The triton.jit function the Triton path launches; None without Triton.
_JIT_KERNELS = (_rmsnorm_kernel,) if triton is not None else None


@torch.no_grad()
def rmsnorm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, style: RMSNormStyle = "llama"
) -> torch.Tensor:
    """``rmsnorm_reference`` in one Triton kernel launch; same arguments, within 1e-5 in float32.

    Forward only (no autograd). A row-strided ``x`` (a view with unit column stride) is read in place;
    other layouts are copied to contiguous first.

    Raises:
        ValueError: what ``rmsnorm_reference`` rejects; rows wider than ``MAX_HIDDEN``; dtypes other than
            float32, bfloat16 and float16; Triton not installed; tensors neither on CUDA nor on the CPU
            under ``TRITON_INTERPRET=1``.
    """
    _validate(x, weight, eps, style)
    hidden = weight.shape[0]
    if hidden > MAX_HIDDEN:
        raise ValueError(
            f"the RMSNorm kernel takes rows of at most {MAX_HIDDEN} values, got {hidden}. Hint: load the model "
            "with kernels='reference'."
        )
    if x.dtype not in _KERNEL_DTYPES or weight.dtype not in _KERNEL_DTYPES:
        raise ValueError(
            f"the RMSNorm kernel takes float32, bfloat16 or float16, got x {x.dtype} and weight {weight.dtype}."
        )
    require_triton(
        "rmsnorm_triton", x.device, _JIT_KERNELS, instead="rmsnorm_reference (kernels='reference')"
    )
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if style == "llama" else x.dtype
    rows_in = x.reshape(-1, hidden)  # (R, H), a view whenever the layout allows
    if rows_in.stride(1) != 1:
        rows_in = rows_in.contiguous()
    rows = rows_in.shape[0]
    out = torch.empty((rows, hidden), dtype=out_dtype, device=x.device)  # (R, H)
    if rows == 0:
        return out.view(x.shape)
    args = (rows_in, weight.contiguous(), out, rows, hidden, rows_in.stride(0), float(eps))
    bucket = size_bucket(rows, low=_R_BUCKETS[0], high=_R_BUCKETS[1])
    # Triton launches on the current CUDA device: make it x's (models may sit on several GPUs).
    on_device = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        _rmsnorm_tuned.launch(
            lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),),
            *args,
            bucket,
            CAST_BEFORE_WEIGHT=style == "llama",
            ONE_PLUS_WEIGHT=style == "gemma",
            BLOCK_H=triton.next_power_of_2(hidden),
        )
    return out.view(*x.shape[:-1], hidden)


# --- swapping the kernel into a model ----------------------------------------------------------------


def rmsnorm_style(module: nn.Module) -> RMSNormStyle | None:
    """``llama`` or ``gemma`` if ``module`` computes that RMSNorm exactly (its code is that code), else None.

    Only the class's code counts, not its name: a module is ``llama`` if its class's forward is
    ``LlamaRMSNorm.forward``'s code and it has a ``weight`` tensor and a numeric ``variance_epsilon``;
    ``gemma`` if its forward and ``_norm`` are ``GemmaRMSNorm``'s and it has a ``weight`` and ``eps``.
    """
    cls = type(module)
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    if _same_code(getattr(cls, "forward", None), _llama_forward) and _is_number(
        getattr(module, "variance_epsilon", None)
    ):
        return "llama"
    if (
        _same_code(getattr(cls, "forward", None), _gemma_forward)
        and _same_code(getattr(cls, "_norm", None), _gemma_norm)
        and _is_number(getattr(module, "eps", None))
    ):
        return "gemma"
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fused_llama_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    _refuse_autograd(self, hidden_states)
    # nn.Module types attributes as Tensor | Module; rmsnorm_style checked a weight tensor and a number.
    weight, eps = cast(torch.Tensor, self.weight), cast(float, self.variance_epsilon)
    return rmsnorm_triton(hidden_states, weight, eps, style="llama")


def _fused_gemma_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    _refuse_autograd(self, x)
    # nn.Module types attributes as Tensor | Module; rmsnorm_style checked a weight tensor and a number.
    weight, eps = cast(torch.Tensor, self.weight), cast(float, self.eps)
    return rmsnorm_triton(x, weight, eps, style="gemma")


_FUSED_FORWARDS: dict[RMSNormStyle, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "llama": _fused_llama_forward,
    "gemma": _fused_gemma_forward,
}


def _refuse_autograd(module: nn.Module, x: torch.Tensor) -> None:
    """Raise rather than return an output that silently cuts the graph (the kernel is forward only)."""
    if torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad):
        raise RuntimeError(
            f"{type(module).__name__} runs the fused RMSNorm kernel, which is forward only, but gradients are "
            "being recorded. Hint: run the model under torch.inference_mode() (or torch.no_grad()), or load "
            "it with kernels='reference' to train it."
        )


def _is_fused(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ in _FUSED_FORWARDS.values()


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def fuse_rmsnorm(model: nn.Module, kernels: KernelsName) -> int:
    """Run every RMSNorm module of ``model`` through the Triton kernel, if ``kernels`` selects Triton.

    Called once at load time, after the model is on its device. Matching modules (see ``rmsnorm_style``;
    class names ending in ``RMSNorm`` are the candidates) get an instance ``forward`` calling
    ``rmsnorm_triton`` with their own weight and epsilon, read at each call; everything else about them is
    unchanged. Candidates whose code is neither form are left on their own forward, named in a warning.
    Already fused modules are skipped, so a second call replaces nothing.

    Args:
        model: a loaded model (any ``nn.Module``); the device of its first parameter decides.
        kernels: ``auto`` (Triton on CUDA, nothing elsewhere), ``triton`` (or an error saying why it cannot
            run) or ``reference`` (nothing).

    Returns:
        How many modules were replaced: 0 on the reference path.

    Raises:
        ValueError: what ``rmserve_kernels.selection.use_triton`` raises; a matching module whose weight is
            not a 1-D float32/bfloat16/float16 tensor of at most ``MAX_HIDDEN`` values (the message names it
            and says to load with ``kernels='reference'``). Nothing is replaced then.
    """
    device = _model_device(model)
    if not use_triton(device, kernels, jit_kernels=_JIT_KERNELS):
        return 0
    chosen: list[tuple[nn.Module, RMSNormStyle]] = []
    styles: Counter[str] = Counter()
    left: Counter[str] = Counter()
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("RMSNorm") or _is_fused(module):
            continue
        style = rmsnorm_style(module)
        if style is None:
            left[type(module).__name__] += 1
            continue
        weight = module.weight
        if weight.ndim != 1 or weight.dtype not in _KERNEL_DTYPES or weight.shape[0] > MAX_HIDDEN:
            raise ValueError(
                f"{name} ({type(module).__name__}) has a weight of shape {tuple(weight.shape)} and dtype "
                f"{weight.dtype}; the fused RMSNorm kernel takes a 1-D float32, bfloat16 or float16 weight of "
                f"at most {MAX_HIDDEN} values. Hint: load the model with kernels='reference'."
            )
        chosen.append((module, style))
        styles[f"{type(module).__name__} ({style})"] += 1
    for module, style in chosen:
        module.forward = types.MethodType(_FUSED_FORWARDS[style], module)
    if left:
        log.warning(
            "RMSNorm modules left on their own forward (their code is neither Llama's nor Gemma's RMSNorm, "
            "which the fused kernel computes): %s",
            ", ".join(f"{n} x{c}" for n, c in sorted(left.items())),
        )
    where = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    log.info(
        "fused %d RMSNorm modules of %s into the Triton kernel: %s",
        len(chosen),
        where,
        ", ".join(f"{n} x{c}" for n, c in sorted(styles.items())) or "none found",
    )
    return len(chosen)
