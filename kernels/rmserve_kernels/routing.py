"""The MoE router, which experts each token uses with what weights: a Triton kernel and its torch reference.

This module owns the routing of one MoE layer that replaces a decoder layer's FFN (UMM-RM, section 3.1,
eq. 6-7), on the flattened tokens of a batch, x (T, H): router logits ``r = x @ router_weight.T`` (T, N-1)
in float32, affinities ``s = softmax(r)`` over the N-1 normal experts, the top-(K-1) of them (ties: lowest
index first; a NaN affinity counts as the largest, as in ``torch.sort``), their weights ``g_i`` by one of
two rules, and the shared expert's ``1 - s_max``; the K weights of a token sum to 1:

- ``xft`` (UMM-RM eq. 7, as XFT's code computes it): ``g_i = softmax over the selected (s)_i * s_max``, a
  softmax of the selected affinities themselves, times the largest affinity;
- ``renorm``: ``g_i = s_i / sum_selected(s) * s_max``, the selected affinities renormalised.

With K - 1 = 1 both give ``g = s_max``. The result is a ``Routing``, which the routed experts (``rmserve_kernels.experts``) take; ``rmserve_kernels.moe_layer``
composes the layer and chooses the implementation.

``route_reference`` defines the semantics in plain torch, all math in float32, and is differentiable (the
router learns through g_i and 1 - s_max, so training uses it); ``route_triton`` computes the same in one
Triton kernel launch, forward only, and matches it to 1e-5 in float32. ``validate_route`` (the argument
checks) is shared with ``rmserve_kernels.moe_layer``.

Launch configurations (the rules every kernel shares are in ``rmserve_kernels.tuning``). On CUDA the kernel
is autotuned, keyed on H, N-1, K-1 and a power-of-two bucket of the tokens (16..8192), over 7 tiles of 16 to
128 tokens by 64 or 128 hidden columns. The kernel reads every token once and the (H, N-1) router once
per program: 16-token tiles spread a short batch over the SMs, 64 and 128 read the router for more tokens
at a time when there are thousands. Launches prune tiles with more tokens than the bucket, a router tile
``BLOCK_H * BLOCK_E`` above 8192 elements, or a selection tile ``BLOCK_T * BLOCK_E`` above 4096 (the
top-k loop keeps four such tiles in registers); 16 x 64 fits every launch. Interpreter: 16 x 64.

Triton is optional: without it this module imports and the reference works. The kernel runs on CUDA
tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` exported before the process
starts, float32 only: see ``rmserve_kernels.heads`` for why the mode cannot change later).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from rmserve_kernels._moe_shared import (
    MIN_BLOCK,
    check_devices,
    check_float,
    needs_fp32_dot,
    np2,
    on_device,
    ready_for_kernels,
)
from rmserve_kernels.tuning import Tile, TuningSpace, autotuned, size_bucket

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is all there is
    triton = None
    tl = None

__all__ = [
    "MAX_KERNEL_EXPERTS",
    "MAX_KERNEL_TOP_K",
    "ROUTING_RULES",
    "Routing",
    "RoutingRule",
    "route_reference",
    "route_triton",
]

RoutingRule = Literal["xft", "renorm"]
"""How the selected experts' affinities become weights (see the module docstring)."""
ROUTING_RULES: tuple[RoutingRule, ...] = ("xft", "renorm")

MAX_KERNEL_EXPERTS = 64
"""The most normal experts (N-1) the routing kernel takes: a program holds (16, next_pow2(N-1)) tiles."""
MAX_KERNEL_TOP_K = 8
"""The most routed experts per token (K-1) the routing kernel takes: it selects them one by one."""

_T_BUCKETS = (16, 8192)  # the routing key's token bucket: next power of two of T, clamped to this range


@dataclass(frozen=True)
class Routing:
    """Which normal experts each token uses, and with what weights.

    Attributes:
        expert_index: (T, K-1) long, the selected normal experts, 0-based among the N-1 normal experts, by
            decreasing affinity.
        expert_weight: (T, K-1) float32, their weights g_i.
        shared_weight: (T,) float32, the shared expert's weight 1 - s_max.
    """

    expert_index: torch.Tensor
    expert_weight: torch.Tensor
    shared_weight: torch.Tensor


def validate_route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, rule: str = "xft") -> None:
    if rule not in ROUTING_RULES:
        raise ValueError(f"routing rule {rule!r} is unknown; use one of {', '.join(ROUTING_RULES)}.")
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(
            f"x must be a (T, H) floating tensor, one row per token, got shape {tuple(x.shape)} and dtype "
            f"{x.dtype}; flatten a (B, S, H) batch with x.reshape(-1, H)."
        )
    check_float("router_weight", router_weight, (-1, x.shape[1]), "N-1 normal experts by the hidden size H")
    experts = router_weight.shape[0]
    if experts < 1:
        raise ValueError("router_weight has no rows: an MoE layer needs at least one normal expert.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ValueError(
            f"top_k={top_k!r} is not a number of routed experts: use 1..{experts} (K-1, the experts per token "
            "besides the shared one)."
        )
    check_devices(x, {"router_weight": router_weight})


def route_reference(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int, rule: RoutingRule = "xft"
) -> Routing:
    """Route every token to its top-``top_k`` normal experts, in plain torch and float32 (the definition).

    Args:
        x: the tokens' hidden states, (T, H), any float dtype.
        router_weight: the router, (N-1, H), one row per normal expert (no bias).
        top_k: K-1, how many normal experts each token uses, 1..N-1.
        rule: ``xft`` or ``renorm``, how the selected affinities become weights.

    Returns:
        ``Routing`` on ``x``'s device.

    Raises:
        ValueError: shapes that do not fit, ``top_k`` out of range, an unknown rule, or tensors on another
            device than x.
    """
    validate_route(x, router_weight, top_k, rule)
    logits = x.float() @ router_weight.float().T  # (T, N-1)
    affinity = torch.softmax(logits, dim=-1)  # (T, N-1)
    ranked, order = torch.sort(affinity, dim=-1, descending=True, stable=True)  # (T, N-1) both
    top = ranked[:, :top_k]  # (T, K-1)
    s_max = ranked[:, 0]  # (T,)
    if rule == "xft":
        weight = torch.softmax(top, dim=-1) * s_max[:, None]  # (T, K-1)
    else:
        weight = top / top.sum(dim=-1, keepdim=True) * s_max[:, None]  # (T, K-1)
    return Routing(order[:, :top_k].contiguous(), weight, 1.0 - s_max)


def _route_tile_fits(launch: Mapping[str, int]) -> bool:
    """Whether a routing tile suits a launch (see the module docstring)."""
    return (
        launch["BLOCK_T"] <= launch["T_BUCKET"]
        and launch["BLOCK_H"] * launch["BLOCK_E"] <= 8192
        and launch["BLOCK_T"] * launch["BLOCK_E"] <= 4096
        and launch["BLOCK_H"] <= max(64, np2(launch["H"]))
    )


_ROUTE_TUNING = TuningSpace(
    candidates=(
        Tile({"BLOCK_T": 16, "BLOCK_H": 64}, num_warps=4, num_stages=3),  # fits every launch
        Tile({"BLOCK_T": 16, "BLOCK_H": 128}, num_warps=4, num_stages=3),
        Tile({"BLOCK_T": 32, "BLOCK_H": 64}, num_warps=4, num_stages=3),
        Tile({"BLOCK_T": 32, "BLOCK_H": 128}, num_warps=4, num_stages=4),
        Tile({"BLOCK_T": 64, "BLOCK_H": 64}, num_warps=8, num_stages=3),
        Tile({"BLOCK_T": 64, "BLOCK_H": 128}, num_warps=8, num_stages=3),
        Tile({"BLOCK_T": 128, "BLOCK_H": 64}, num_warps=8, num_stages=3),
    ),
    interpreter=Tile({"BLOCK_T": 16, "BLOCK_H": 64}),
    dot_sides=("BLOCK_T", "BLOCK_H"),
    fits=_route_tile_fits,
)
"""The routing kernel's launch configurations."""

if triton is not None:

    @triton.jit
    def _route_kernel(
        x_ptr,  # (T, H)
        router_ptr,  # (E, H)
        index_ptr,  # out (T, TOP_K) int64 contiguous
        weight_ptr,  # out (T, TOP_K) float32 contiguous
        shared_ptr,  # out (T,) float32
        T,
        H,
        E,
        T_BUCKET,  # unused by the program: the autotuner's key, T's power-of-two bucket
        stride_xt,
        stride_xh,
        stride_re,
        stride_rh,
        TOP_K: tl.constexpr,
        XFT: tl.constexpr,  # the xft rule (else renorm)
        FP32_DOT: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_T: tl.constexpr,  # tuned
        BLOCK_H: tl.constexpr,  # tuned
    ):
        """Logits, softmax, top-TOP_K selection and weights of BLOCK_T tokens, all in registers.

        Columns >= E are padding (BLOCK_E is a power of two >= 16 for tl.dot). Selection takes TOP_K times
        the largest remaining affinity, the lowest column of equal ones, and records its rank in a
        (BLOCK_T, BLOCK_E) tile, so one scattered store writes every index and weight in rank order.
        """
        pid = tl.program_id(0)
        rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # (BLOCK_T,) T * H may pass 2**31
        cols = tl.arange(0, BLOCK_E)  # (BLOCK_E,)
        row_ok = rows < T  # (BLOCK_T,)
        col_ok = cols < E  # (BLOCK_E,)

        logits = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)  # (BLOCK_T, BLOCK_E)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
            h_ok = hs < H  # (BLOCK_H,)
            x = tl.load(
                x_ptr + rows[:, None] * stride_xt + hs[None, :] * stride_xh,
                mask=row_ok[:, None] & h_ok[None, :],
                other=0.0,
            )  # (BLOCK_T, BLOCK_H)
            w = tl.load(
                router_ptr + hs[:, None] * stride_rh + cols[None, :] * stride_re,
                mask=h_ok[:, None] & col_ok[None, :],
                other=0.0,
            )  # (BLOCK_H, BLOCK_E) = router_weight.T tile
            if FP32_DOT:  # mixed or float32 inputs; bf16 x bf16 products are exact in the fp32 accumulator
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            logits = tl.dot(x, w, logits, input_precision="ieee")  # (BLOCK_T, BLOCK_E)

        # Softmax over the E real columns. Padding is masked after the subtraction: a row of NaN logits
        # may have a -inf maximum (tl.max can skip NaN), and -inf - -inf would be one more NaN source.
        row_max = tl.max(tl.where(col_ok[None, :], logits, float("-inf")), axis=1)  # (BLOCK_T,)
        shifted = tl.where(col_ok[None, :], logits - row_max[:, None], float("-inf"))  # (BLOCK_T, BLOCK_E)
        z = tl.exp(shifted)  # (BLOCK_T, BLOCK_E) padding -> 0
        prob = z / tl.sum(z, axis=1)[:, None]  # (BLOCK_T, BLOCK_E)

        # Selection key: a NaN affinity ranks first (torch.sort does so), padding and taken columns last.
        key = tl.where(prob != prob, 2.0, prob)  # (BLOCK_T, BLOCK_E)
        key = tl.where(col_ok[None, :], key, -1.0)  # (BLOCK_T, BLOCK_E)
        rank = tl.full((BLOCK_T, BLOCK_E), -1, dtype=tl.int32)  # (BLOCK_T, BLOCK_E) -1: not selected
        for j in tl.static_range(TOP_K):
            best = tl.max(key, axis=1)  # (BLOCK_T,)
            pick = tl.min(tl.where(key == best[:, None], cols[None, :], BLOCK_E), axis=1)  # (BLOCK_T,)
            chosen = cols[None, :] == pick[:, None]  # (BLOCK_T, BLOCK_E)
            rank = tl.where(chosen, j, rank)
            key = tl.where(chosen, -1.0, key)

        selected = rank >= 0  # (BLOCK_T, BLOCK_E)
        s_max = tl.sum(tl.where(rank == 0, prob, 0.0), axis=1)  # (BLOCK_T,) the first pick
        if XFT:  # softmax over the selected affinities; s_max is their largest, so exp(.) <= 1
            share = tl.where(selected, tl.exp(prob - s_max[:, None]), 0.0)  # (BLOCK_T, BLOCK_E)
        else:
            share = tl.where(selected, prob, 0.0)  # (BLOCK_T, BLOCK_E)
        total = tl.sum(share, axis=1)  # (BLOCK_T,)
        weight = share / total[:, None] * s_max[:, None]  # (BLOCK_T, BLOCK_E)
        out = rows[:, None] * TOP_K + rank  # (BLOCK_T, BLOCK_E)
        out_mask = row_ok[:, None] & selected  # (BLOCK_T, BLOCK_E)
        expert = tl.broadcast_to(cols[None, :], (BLOCK_T, BLOCK_E)).to(tl.int64)  # (BLOCK_T, BLOCK_E)
        tl.store(index_ptr + out, expert, mask=out_mask)
        tl.store(weight_ptr + out, weight, mask=out_mask)
        tl.store(shared_ptr + rows, 1.0 - s_max, mask=row_ok)

    _route_tuned = autotuned(_route_kernel, _ROUTE_TUNING, key=("H", "E", "TOP_K", "T_BUCKET"))


# The triton.jit functions route_triton launches; None without Triton.
JIT_KERNELS = (_route_kernel,) if triton is not None else None


@torch.no_grad()
def route_triton(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int, rule: RoutingRule = "xft"
) -> Routing:
    """``route_reference`` in one Triton kernel launch; same arguments, weights within 1e-5.

    The selected experts are the reference's, except where two affinities are closer than float32
    rounding of the logits (then either may be chosen); exact ties go to the lowest index in both.

    Raises:
        ValueError: what ``route_reference`` rejects; more than ``MAX_KERNEL_EXPERTS`` normal experts or
            ``top_k`` above ``MAX_KERNEL_TOP_K``; Triton not installed; tensors neither on CUDA nor on the
            CPU under ``TRITON_INTERPRET=1``.
    """
    validate_route(x, router_weight, top_k, rule)
    tokens, hidden = x.shape
    experts = router_weight.shape[0]
    if experts > MAX_KERNEL_EXPERTS or top_k > MAX_KERNEL_TOP_K:
        raise ValueError(
            f"the routing kernel takes at most {MAX_KERNEL_EXPERTS} normal experts and top_k <= "
            f"{MAX_KERNEL_TOP_K}, got {experts} and {top_k}. Hint: load the model with kernels='reference'."
        )
    ready_for_kernels("route_triton", x.device, JIT_KERNELS)
    device = x.device
    index = torch.empty((tokens, top_k), dtype=torch.long, device=device)  # (T, K-1)
    weight = torch.empty((tokens, top_k), dtype=torch.float32, device=device)  # (T, K-1)
    shared = torch.empty((tokens,), dtype=torch.float32, device=device)  # (T,)
    if tokens == 0:
        return Routing(index, weight, shared)
    with on_device(device):
        _route_tuned.launch(
            lambda meta: (triton.cdiv(tokens, meta["BLOCK_T"]),),
            x,
            router_weight,
            index,
            weight,
            shared,
            tokens,
            hidden,
            experts,
            size_bucket(tokens, low=_T_BUCKETS[0], high=_T_BUCKETS[1]),
            x.stride(0),
            x.stride(1),
            router_weight.stride(0),
            router_weight.stride(1),
            TOP_K=top_k,
            XFT=rule == "xft",
            FP32_DOT=needs_fp32_dot(x, router_weight),
            BLOCK_E=max(MIN_BLOCK, triton.next_power_of_2(experts)),
        )
    return Routing(index, weight, shared)
