"""The arguments of the heads-and-aggregates step, checked: one contract for the reference and the kernel.

``heads_aggregate_reference`` and ``heads_aggregate_triton`` (``rmserve_kernels.heads``) take the same
arguments and refuse the same mistakes, with messages that say how to fix the call:
``validate_heads_aggregate`` checks shapes, dtypes and devices without reading a device value (so the
kernel's launch never waits on the host), including those of fused pooling (``positions``, built by
``rmserve_kernels.heads.scored_positions``); ``check_position_range`` reads the positions (one host sync
on CUDA), which only the reference does.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_position_range", "is_integer", "validate_heads_aggregate"]


def validate_heads_aggregate(
    pooled: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    std_weight: torch.Tensor | None,
    std_bias: torch.Tensor | None,
    nominal_head: int | None,
    uwo_lambda: torch.Tensor,
    tradeoff_lambda: torch.Tensor,
    eps: float,
    positions: torch.Tensor | None,
) -> None:
    """Raise a ValueError naming the first argument that does not fit the others (no device values read)."""
    if positions is None and (pooled.ndim != 2 or not pooled.is_floating_point()):
        hint = (
            "; these look like (B, T, H) hidden states: pass positions= (see scored_positions) to pool them"
            if pooled.ndim == 3
            else ""
        )
        raise ValueError(
            f"pooled must be a (B, H) floating tensor (one pooled hidden state per input), "
            f"got shape {tuple(pooled.shape)} and dtype {pooled.dtype}{hint}."
        )
    if positions is not None:
        _validate_positions(pooled, positions)
    rows, hidden = pooled.shape[0], pooled.shape[-1]
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a (k, H) floating tensor (one row per head), got shape {tuple(weight.shape)} "
            f"and dtype {weight.dtype}."
        )
    k = weight.shape[0]
    if k < 1:
        raise ValueError("weight has no rows: a reward model needs at least one head (k >= 1).")
    if weight.shape[1] != hidden:
        raise ValueError(
            f"weight is {tuple(weight.shape)} but pooled has H={hidden}; the heads must read the backbone's "
            f"hidden size (weight (k, {hidden}))."
        )
    if std_weight is not None and (std_weight.shape != weight.shape or not std_weight.is_floating_point()):
        raise ValueError(
            f"std_weight must be a floating tensor shaped like weight {tuple(weight.shape)}, "
            f"got {tuple(std_weight.shape)} ({std_weight.dtype})."
        )
    if std_bias is not None and std_weight is None:
        raise ValueError("std_bias was given without std_weight; pass both (BRME) or neither.")
    for name, vector in (("bias", bias), ("std_bias", std_bias)):
        if vector is not None and (vector.shape != (k,) or not vector.is_floating_point()):
            raise ValueError(
                f"{name} must be a floating ({k},) tensor, one per head, got {tuple(vector.shape)}."
            )
    if nominal_head is None:
        if std_weight is None:
            raise ValueError(
                "nominal_head=None picks the head with the smallest sigma, which needs std_weight (BRME); "
                "pass a head index instead for multi-head or dense models."
            )
    elif isinstance(nominal_head, bool) or not 0 <= nominal_head < k:
        raise ValueError(f"nominal_head={nominal_head!r} is not a head index; use 0..{k - 1} or None (BRME).")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps (the sigma floor) must be a finite number >= 0, got {eps}.")
    for name, lam in (("uwo_lambda", uwo_lambda), ("tradeoff_lambda", tradeoff_lambda)):
        if lam.shape != (rows,):
            raise ValueError(
                f"{name} must be ({rows},), one per input of pooled, got {tuple(lam.shape)}; "
                f"broadcast a scalar with torch.full(({rows},), value)."
            )
    tensors = {"weight": weight, "bias": bias, "std_weight": std_weight, "std_bias": std_bias}
    tensors |= {"uwo_lambda": uwo_lambda, "tradeoff_lambda": tradeoff_lambda, "positions": positions}
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != pooled.device:
            raise ValueError(
                f"{name} is on {tensor.device} but pooled is on {pooled.device}; "
                "move it with .to(pooled.device)."
            )


def is_integer(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def _validate_positions(hidden: torch.Tensor, positions: torch.Tensor) -> None:
    """Shapes and dtypes of fused pooling: hidden (B, T, H) floating, positions (B,) integer, T >= 1."""
    if hidden.ndim != 3 or not hidden.is_floating_point():
        raise ValueError(
            f"with positions, pooled must be the (B, T, H) floating final hidden states, got shape "
            f"{tuple(hidden.shape)} and dtype {hidden.dtype}; pass (B, H) pooled states without positions."
        )
    rows, seq_len, _ = hidden.shape
    if positions.shape != (rows,) or not is_integer(positions):
        raise ValueError(
            f"positions must be a ({rows},) integer tensor, the scored token of each sequence, got shape"
            f" {tuple(positions.shape)} and dtype {positions.dtype}; build it with scored_positions."
        )
    if seq_len == 0 and rows > 0:
        raise ValueError(
            f"pooled is {tuple(hidden.shape)}: sequences of no token (T=0) have no token to score."
        )


def check_position_range(positions: torch.Tensor, seq_len: int) -> None:
    """Raise unless every position is in 0..seq_len-1 (reads the positions: one host sync on CUDA)."""
    if positions.numel() == 0:
        return
    low, high = int(positions.min()), int(positions.max())
    if low < 0 or high >= seq_len:
        raise ValueError(
            f"positions hold values from {low} to {high}, but the hidden states have T={seq_len} positions "
            f"(0..{seq_len - 1}); build them with scored_positions from lengths in 1..{seq_len}."
        )
