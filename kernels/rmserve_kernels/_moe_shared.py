"""What the MoE kernel modules share: argument checks that say how to fix a call, and launch helpers.

``rmserve_kernels.routing``, ``rmserve_kernels.experts`` and ``rmserve_kernels.moe_layer`` check their
tensors with ``check_float`` and ``check_devices``, and launch their kernels with the helpers here: the
Triton check (``ready_for_kernels``), the CUDA device (``on_device``), the ``tl.dot`` precision
(``needs_fp32_dot``) and the tile sides (``MIN_BLOCK``, ``np2``). Internal to the package, not API.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from rmserve_kernels.selection import require_triton

__all__ = [
    "MIN_BLOCK",
    "check_devices",
    "check_float",
    "needs_fp32_dot",
    "np2",
    "on_device",
    "ready_for_kernels",
]

MIN_BLOCK = 16  # tl.dot needs every tile side >= 16


def check_float(name: str, tensor: torch.Tensor, shape: tuple[int, ...], meaning: str) -> None:
    """Raise unless ``tensor`` is floating with ``shape`` (-1 matches any size)."""
    fits = tensor.ndim == len(shape) and all(
        want in (-1, got) for want, got in zip(shape, tensor.shape, strict=True)
    )
    if not fits or not tensor.is_floating_point():
        wanted = "(" + ", ".join("*" if s == -1 else str(s) for s in shape) + ("," if len(shape) == 1 else "")
        raise ValueError(
            f"{name} must be a floating {wanted}) tensor ({meaning}), got shape {tuple(tensor.shape)} and "
            f"dtype {tensor.dtype}."
        )


def check_devices(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.device != x.device:
            raise ValueError(
                f"{name} is on {tensor.device} but x is on {x.device}; move it with .to(x.device)."
            )


def np2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


def ready_for_kernels(name: str, device: torch.device, jit_kernels: Sequence[object] | None) -> None:
    """Raise a ValueError saying how to fix it unless Triton can run ``jit_kernels`` on ``device`` now."""
    require_triton(name, device, jit_kernels, instead="the *_reference functions (kernels='reference')")


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' (models may span several GPUs)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def needs_fp32_dot(*tensors: torch.Tensor) -> bool:
    """Whether kernels cast tiles to float32 for tl.dot: unless all are the same 16-bit float type.

    A bf16 x bf16 (or fp16 x fp16) product is exact in float32, so tensor-core dots with a float32
    accumulator compute what the float32 reference does, up to summation order.
    """
    dtypes = {t.dtype for t in tensors}
    return not (len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16})
