"""UMM-RM's upcycled MoE layer (shared expert + routed SwiGLU experts): Triton kernels and torch references.

This module owns the math of one MoE layer that replaces a decoder layer's FFN (UMM-RM, section 3.1,
eq. 5-7), on the flattened tokens of a batch, x (T, H):

- routing (``route_*``): router logits ``r = x @ router_weight.T`` (T, N-1) in float32, affinities
  ``s = softmax(r)`` over the N-1 normal experts, the top-(K-1) of them (ties: lowest index first; a NaN
  affinity counts as the largest, as in ``torch.sort``), ``g_i = s_i / sum_selected(s) * s_max`` and the
  shared expert's ``1 - s_max``; the K weights of a token sum to 1;
- the routed experts (``grouped_swiglu_*``): each token's ``sum_i g_i * down_i(silu(gate_i x) * up_i x)``,
  computed per expert on the tokens routed to it (assignments sorted by expert), never per token;
- the layer (``moe_layer_*``): ``(1 - s_max) * shared(x)`` plus the routed experts.

The ``*_reference`` functions define the semantics in plain torch, all math in float32, and are
differentiable (the router learns through g_i and 1 - s_max, so training uses them); the ``*_triton`` ones
compute the same with Triton kernels, forward only, and match them to 1e-5 in float32. ``select_moe_kernels`` picks
one set, once, when a model is loaded (same rules as ``rmserve_kernels.heads.select_heads_aggregate``).

Launch configurations (the rules every kernel shares are in ``rmserve_kernels.tuning``). On CUDA both
kernels are autotuned; under the interpreter each runs one tile.

- Routing, keyed on H, N-1, K-1 and a power-of-two bucket of the tokens (16..8192), over 7 tiles of 16 to
  128 tokens by 64 or 128 hidden columns. The kernel reads every token once and the (H, N-1) router once
  per program: 16-token tiles spread a short batch over the SMs, 64 and 128 read the router for more tokens
  at a time when there are thousands. Launches prune tiles with more tokens than the bucket, a router tile
  ``BLOCK_H * BLOCK_E`` above 8192 elements, or a selection tile ``BLOCK_T * BLOCK_E`` above 4096 (the
  top-k loop keeps four such tiles in registers); 16 x 64 fits every launch. Interpreter: 16 x 64.
- Grouped SwiGLU, keyed on H, F and the row tile ``BLOCK_M``, over 7 (BLOCK_F, BLOCK_H) tiles from 32 x 32
  to 128 x 128. ``BLOCK_M`` (16..64, from the rows per expert) is not tuned: the host plans the row tiles
  of each expert's group with it before the launch. Phase 1 holds two (BLOCK_M, BLOCK_F) accumulators and
  two (BLOCK_H, BLOCK_F) weight tiles, phase 2 a (BLOCK_M, BLOCK_H) one: launches prune tiles where any of
  these passes 8192 elements, or wider than F or H (rounded up to a power of two, at least 32). Wide
  tiles with 8 warps suit the large FFNs of 7B-class models (F ~ 11008-14336), 64 x 64 with 3-4 stages the
  mid-sized ones; 32 x 32 fits every launch. Interpreter: 64 x 64.

Triton is optional: without it this module imports and the references work. The kernels run on CUDA
tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` exported before the process
starts, float32 only: see ``rmserve_kernels.heads`` for why the mode cannot change later).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from rmserve_kernels.selection import require_triton, use_triton
from rmserve_kernels.tuning import Tile, TuningSpace, autotuned, size_bucket

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references are all there is
    triton = None
    tl = None

__all__ = [
    "MAX_KERNEL_EXPERTS",
    "MAX_KERNEL_TOP_K",
    "REFERENCE_KERNELS",
    "TRITON_KERNELS",
    "MoeKernels",
    "Routing",
    "grouped_swiglu_reference",
    "grouped_swiglu_triton",
    "moe_layer_reference",
    "moe_layer_triton",
    "route_reference",
    "route_triton",
    "select_moe_kernels",
]

MAX_KERNEL_EXPERTS = 64
"""The most normal experts (N-1) the routing kernel takes: a program holds (16, next_pow2(N-1)) tiles."""
MAX_KERNEL_TOP_K = 8
"""The most routed experts per token (K-1) the routing kernel takes: it selects them one by one."""

_MIN_BLOCK = 16  # tl.dot needs every tile side >= 16
_T_BUCKETS = (16, 8192)  # the routing key's token bucket: next power of two of T, clamped to this range

Swiglu = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""One SwiGLU FFN's weights: gate (F, H), up (F, H), down (H, F)."""


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


# --- validation -----------------------------------------------------------------------------------------


def _check_float(name: str, tensor: torch.Tensor, shape: tuple[int, ...], meaning: str) -> None:
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


def _check_devices(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.device != x.device:
            raise ValueError(
                f"{name} is on {tensor.device} but x is on {x.device}; move it with .to(x.device)."
            )


def _validate_route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> None:
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(
            f"x must be a (T, H) floating tensor, one row per token, got shape {tuple(x.shape)} and dtype "
            f"{x.dtype}; flatten a (B, S, H) batch with x.reshape(-1, H)."
        )
    _check_float("router_weight", router_weight, (-1, x.shape[1]), "N-1 normal experts by the hidden size H")
    experts = router_weight.shape[0]
    if experts < 1:
        raise ValueError("router_weight has no rows: an MoE layer needs at least one normal expert.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ValueError(
            f"top_k={top_k!r} is not a number of routed experts: use 1..{experts} (K-1, the experts per token "
            "besides the shared one)."
        )
    _check_devices(x, {"router_weight": router_weight})


def _validate_experts(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(
            f"x must be a (T, H) floating tensor, one row per token, got shape {tuple(x.shape)} and dtype "
            f"{x.dtype}; flatten a (B, S, H) batch with x.reshape(-1, H)."
        )
    hidden = x.shape[1]
    _check_float("gate", gate, (-1, -1, hidden), "E normal experts' (F, H) gate projections")
    experts, ffn, _ = gate.shape
    if experts < 1 or ffn < 1:
        raise ValueError(f"gate is {tuple(gate.shape)}: the experts need E >= 1 and F >= 1.")
    _check_float("up", up, (experts, ffn, hidden), "stacked like gate")
    _check_float("down", down, (experts, hidden, ffn), "each expert's (H, F) down projection")
    _check_devices(x, {"gate": gate, "up": up, "down": down})


def _validate_routing(routing: Routing, tokens: int, experts: int, device: torch.device) -> None:
    """Shapes, dtypes and devices of ``routing``, and (one host sync) that its indices are experts."""
    index = routing.expert_index
    if index.ndim != 2 or index.shape[0] != tokens or index.shape[1] < 1 or index.dtype != torch.long:
        raise ValueError(
            f"routing.expert_index must be a ({tokens}, K-1) long tensor, got shape {tuple(index.shape)} and "
            f"dtype {index.dtype}; build the routing with route_reference or route_triton."
        )
    _check_float("routing.expert_weight", routing.expert_weight, tuple(index.shape), "one weight per index")
    _check_float("routing.shared_weight", routing.shared_weight, (tokens,), "one per token")
    for name in ("expert_index", "expert_weight", "shared_weight"):
        if getattr(routing, name).device != device:
            raise ValueError(f"routing.{name} is not on x's device {device}; move it with .to(x.device).")
    if index.numel() and bool(((index < 0) | (index >= experts)).any()):
        raise ValueError(
            f"routing.expert_index holds values outside 0..{experts - 1}, but there are {experts} normal "
            "experts; route with the router of this layer."
        )


def _validate_shared(x: torch.Tensor, shared: Swiglu) -> None:
    if not isinstance(shared, tuple) or len(shared) != 3:
        raise ValueError("shared must be the shared expert's (gate (F, H), up (F, H), down (H, F)) tuple.")
    gate, up, down = shared
    _check_float("shared gate", gate, (-1, x.shape[1]), "the shared expert's gate projection")
    _check_float("shared up", up, tuple(gate.shape), "shaped like the shared gate")
    _check_float("shared down", down, (x.shape[1], gate.shape[0]), "the shared expert's down projection")
    _check_devices(x, {"shared gate": gate, "shared up": up, "shared down": down})


def _validate_layer(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    shared: Swiglu,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
) -> None:
    _validate_route(x, router_weight, top_k)
    _validate_experts(x, gate, up, down)
    if router_weight.shape[0] != gate.shape[0]:
        raise ValueError(
            f"router_weight routes to {router_weight.shape[0]} experts but gate stacks {gate.shape[0]}; the "
            "router needs one row per normal expert."
        )
    _validate_shared(x, shared)


# --- references -----------------------------------------------------------------------------------------


def route_reference(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> Routing:
    """Route every token to its top-``top_k`` normal experts, in plain torch and float32 (the definition).

    Args:
        x: the tokens' hidden states, (T, H), any float dtype.
        router_weight: the router, (N-1, H), one row per normal expert (no bias).
        top_k: K-1, how many normal experts each token uses, 1..N-1.

    Returns:
        ``Routing`` on ``x``'s device.

    Raises:
        ValueError: shapes that do not fit, ``top_k`` out of range, or tensors on another device than x.
    """
    _validate_route(x, router_weight, top_k)
    logits = x.float() @ router_weight.float().T  # (T, N-1)
    affinity = torch.softmax(logits, dim=-1)  # (T, N-1)
    ranked, order = torch.sort(affinity, dim=-1, descending=True, stable=True)  # (T, N-1) both
    top = ranked[:, :top_k]  # (T, K-1)
    s_max = ranked[:, 0]  # (T,)
    weight = top / top.sum(dim=-1, keepdim=True) * s_max[:, None]  # (T, K-1)
    return Routing(order[:, :top_k].contiguous(), weight, 1.0 - s_max)


def _swiglu_f32(x32: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x) in float32: x32 (n, H) float32, gate/up (F, H), down (H, F) -> (n, H)."""
    hidden = F.silu(x32 @ gate.float().T) * (x32 @ up.float().T)  # (n, F)
    return hidden @ down.float().T  # (n, H)


def _grouped_reference_f32(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, routing: Routing
) -> torch.Tensor:
    """``grouped_swiglu_reference`` before the cast to x.dtype: (T, H) float32."""
    tokens, hidden = x.shape
    experts = gate.shape[0]
    k = routing.expert_index.shape[1]
    flat = routing.expert_index.reshape(-1)  # (T*k,) expert of each (token, slot)
    order = torch.argsort(flat, stable=True)  # (T*k,) the assignments grouped by expert
    token = order // k  # (T*k,) token of each sorted assignment
    weight = routing.expert_weight.reshape(-1).float()[order]  # (T*k,)
    x32 = x.float()  # (T, H)
    out = torch.zeros((tokens, hidden), dtype=torch.float32, device=x.device)  # (T, H)
    start = 0
    for expert, count in enumerate(torch.bincount(flat, minlength=experts).tolist()):
        if count:
            rows = token[start : start + count]  # (n,) this expert's tokens
            y = _swiglu_f32(x32[rows], gate[expert], up[expert], down[expert])  # (n, H)
            out.index_add_(0, rows, y * weight[start : start + count, None])
        start += count
    return out


def grouped_swiglu_reference(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, routing: Routing
) -> torch.Tensor:
    """The routed experts' weighted sum per token, expert by expert in plain torch (the definition).

    Args:
        x: the tokens' hidden states, (T, H), any float dtype.
        gate: the E normal experts' gate projections, (E, F, H).
        up: their up projections, (E, F, H).
        down: their down projections, (E, H, F).
        routing: each token's experts and weights, from ``route_reference`` or ``route_triton``.

    Returns:
        (T, H) in x.dtype: ``sum_j expert_weight[t, j] * expert_{expert_index[t, j]}(x_t)``, accumulated
        in float32.

    Raises:
        ValueError: shapes that do not fit, routing indices outside 0..E-1, or tensors on other devices.
    """
    _validate_experts(x, gate, up, down)
    _validate_routing(routing, x.shape[0], gate.shape[0], x.device)
    return _grouped_reference_f32(x, gate, up, down, routing).to(x.dtype)


def moe_layer_reference(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    shared: Swiglu,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """One UMM-RM MoE layer (the FFN's replacement, residual not included), in plain torch and float32.

    Args:
        x: the tokens' hidden states, (T, H), any float dtype.
        router_weight: the router, (N-1, H).
        shared: the shared expert's (gate (F, H), up (F, H), down (H, F)).
        gate: the N-1 normal experts' gate projections, (N-1, F, H).
        up: their up projections, (N-1, F, H).
        down: their down projections, (N-1, H, F).
        top_k: K-1, the normal experts per token.

    Returns:
        (T, H) in x.dtype: ``(1 - s_max) * shared(x_t) + sum_i g_i * expert_i(x_t)``.

    Raises:
        ValueError: shapes that do not fit, ``top_k`` out of range, or tensors on other devices.
    """
    _validate_layer(x, router_weight, shared, gate, up, down, top_k)
    routing = route_reference(x, router_weight, top_k)
    shared_out = _swiglu_f32(x.float(), *shared)  # (T, H)
    routed = _grouped_reference_f32(x, gate, up, down, routing)  # (T, H)
    return (routing.shared_weight[:, None] * shared_out + routed).to(x.dtype)


# --- kernels --------------------------------------------------------------------------------------------


def _np2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


def _route_tile_fits(launch: dict[str, int]) -> bool:
    """Whether a routing tile suits a launch (see the module docstring)."""
    return (
        launch["BLOCK_T"] <= launch["T_BUCKET"]
        and launch["BLOCK_H"] * launch["BLOCK_E"] <= 8192
        and launch["BLOCK_T"] * launch["BLOCK_E"] <= 4096
        and launch["BLOCK_H"] <= max(64, _np2(launch["H"]))
    )


def _grouped_tile_fits(launch: dict[str, int]) -> bool:
    """Whether a grouped SwiGLU tile suits a launch (see the module docstring)."""
    block_m, block_f, block_h = launch["BLOCK_M"], launch["BLOCK_F"], launch["BLOCK_H"]
    return (
        max(block_m * block_f, block_m * block_h, block_f * block_h) <= 8192
        and block_f <= max(32, _np2(launch["F"]))
        and block_h <= max(32, _np2(launch["H"]))
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

_GROUPED_TUNING = TuningSpace(
    candidates=(
        Tile({"BLOCK_F": 32, "BLOCK_H": 32}, num_warps=4, num_stages=2),  # fits every launch
        Tile({"BLOCK_F": 32, "BLOCK_H": 128}, num_warps=4, num_stages=3),
        Tile({"BLOCK_F": 64, "BLOCK_H": 64}, num_warps=4, num_stages=3),
        Tile({"BLOCK_F": 64, "BLOCK_H": 64}, num_warps=4, num_stages=4),
        Tile({"BLOCK_F": 64, "BLOCK_H": 128}, num_warps=8, num_stages=3),
        Tile({"BLOCK_F": 128, "BLOCK_H": 64}, num_warps=8, num_stages=3),
        Tile({"BLOCK_F": 128, "BLOCK_H": 128}, num_warps=8, num_stages=2),
    ),
    interpreter=Tile({"BLOCK_F": 64, "BLOCK_H": 64}),
    dot_sides=("BLOCK_F", "BLOCK_H"),
    fits=_grouped_tile_fits,
)
"""The grouped SwiGLU kernel's launch configurations."""

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
        total = tl.sum(tl.where(selected, prob, 0.0), axis=1)  # (BLOCK_T,)
        s_max = tl.sum(tl.where(rank == 0, prob, 0.0), axis=1)  # (BLOCK_T,) the first pick
        weight = prob / total[:, None] * s_max[:, None]  # (BLOCK_T, BLOCK_E)
        out = rows[:, None] * TOP_K + rank  # (BLOCK_T, BLOCK_E)
        out_mask = row_ok[:, None] & selected  # (BLOCK_T, BLOCK_E)
        expert = tl.broadcast_to(cols[None, :], (BLOCK_T, BLOCK_E)).to(tl.int64)  # (BLOCK_T, BLOCK_E)
        tl.store(index_ptr + out, expert, mask=out_mask)
        tl.store(weight_ptr + out, weight, mask=out_mask)
        tl.store(shared_ptr + rows, 1.0 - s_max, mask=row_ok)

    @triton.jit
    def _grouped_swiglu_kernel(
        x_ptr,  # (T, H)
        gate_ptr,  # (E, F, H)
        up_ptr,  # (E, F, H)
        down_ptr,  # (E, H, F)
        slot_ptr,  # (M,) int64: the (token * K + j) slot of each row of the expert-sorted list
        weight_ptr,  # (M,) float32 contiguous, the routing weight of each slot (slot order)
        tile_expert_ptr,  # (G,) int64, the expert of each row tile
        tile_start_ptr,  # (G,) int64, first sorted row of the tile
        tile_end_ptr,  # (G,) int64, one past its last row (== start: an idle program)
        act_ptr,  # scratch (M, F) contiguous, silu(gate x) * up x per sorted row
        out_ptr,  # out (M, H) float32 contiguous, by slot
        H,
        F,
        K,
        stride_xt,
        stride_xh,
        stride_ge,
        stride_gf,
        stride_gh,
        stride_ue,
        stride_uf,
        stride_uh,
        stride_de,
        stride_dh,
        stride_df,
        FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_F: tl.constexpr,  # tuned
        BLOCK_H: tl.constexpr,  # tuned
    ):
        """The whole SwiGLU of one expert on one tile of its tokens, scaled by the routing weights.

        Phase 1 computes the tile's activations silu(x gate.T) * (x up.T), F chunk by F chunk (each an
        H-loop of two tl.dot), into the program's own rows of the scratch; after a barrier, phase 2 reads
        them back for the down projection, H chunk by H chunk, and writes each row, times its routing
        weight, to its token's slot. Every GEMM is done once; no two programs touch the same row.
        """
        pid = tl.program_id(0)
        start = tl.load(tile_start_ptr + pid)
        end = tl.load(tile_end_ptr + pid)
        if start >= end:  # the grid is an upper bound on the number of tiles
            return
        expert = tl.load(tile_expert_ptr + pid)
        rows = start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64 rows of the sorted list
        row_ok = rows < end  # (BLOCK_M,)
        slot = tl.load(slot_ptr + rows, mask=row_ok, other=0)  # (BLOCK_M,)
        x_rows = x_ptr + (slot // K) * stride_xt  # (BLOCK_M,) each row's token
        gate_e = gate_ptr + expert * stride_ge
        up_e = up_ptr + expert * stride_ue
        down_e = down_ptr + expert * stride_de

        for f0 in range(0, F, BLOCK_F):
            fs = f0 + tl.arange(0, BLOCK_F)  # (BLOCK_F,)
            f_ok = fs < F  # (BLOCK_F,)
            acc_gate = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)  # (BLOCK_M, BLOCK_F)
            acc_up = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)  # (BLOCK_M, BLOCK_F)
            for h0 in range(0, H, BLOCK_H):
                hs = h0 + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
                h_ok = hs < H  # (BLOCK_H,)
                xt = tl.load(
                    x_rows[:, None] + hs[None, :] * stride_xh, mask=row_ok[:, None] & h_ok[None, :], other=0.0
                )  # (BLOCK_M, BLOCK_H)
                w_mask = h_ok[:, None] & f_ok[None, :]  # (BLOCK_H, BLOCK_F)
                wg = tl.load(
                    gate_e + hs[:, None] * stride_gh + fs[None, :] * stride_gf, mask=w_mask, other=0.0
                )  # (BLOCK_H, BLOCK_F) = gate[e].T tile
                wu = tl.load(
                    up_e + hs[:, None] * stride_uh + fs[None, :] * stride_uf, mask=w_mask, other=0.0
                )  # (BLOCK_H, BLOCK_F) = up[e].T tile
                if FP32_DOT:
                    xt = xt.to(tl.float32)
                    wg = wg.to(tl.float32)
                    wu = wu.to(tl.float32)
                acc_gate = tl.dot(xt, wg, acc_gate, input_precision="ieee")
                acc_up = tl.dot(xt, wu, acc_up, input_precision="ieee")
            # silu(g) = g * sigmoid(g), with exp of -|g| only: no overflow for large negative g.
            e = tl.exp(-tl.abs(acc_gate))  # (BLOCK_M, BLOCK_F)
            sigmoid = tl.where(acc_gate >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # (BLOCK_M, BLOCK_F)
            act = acc_gate * sigmoid * acc_up  # (BLOCK_M, BLOCK_F) silu(gate x) * up x
            tl.store(
                act_ptr + rows[:, None] * F + fs[None, :],
                act.to(act_ptr.dtype.element_ty),
                mask=row_ok[:, None] & f_ok[None, :],
            )

        # Phase 2 reads scratch written by other threads of this program: make their stores visible.
        tl.debug_barrier()
        weight = tl.load(weight_ptr + slot, mask=row_ok, other=0.0)  # (BLOCK_M,)
        for n0 in range(0, H, BLOCK_H):
            ns = n0 + tl.arange(0, BLOCK_H)  # (BLOCK_H,) output columns
            n_ok = ns < H  # (BLOCK_H,)
            acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)  # (BLOCK_M, BLOCK_H)
            for f0 in range(0, F, BLOCK_F):
                fs = f0 + tl.arange(0, BLOCK_F)  # (BLOCK_F,)
                f_ok = fs < F  # (BLOCK_F,)
                a = tl.load(
                    act_ptr + rows[:, None] * F + fs[None, :], mask=row_ok[:, None] & f_ok[None, :], other=0.0
                )  # (BLOCK_M, BLOCK_F)
                wd = tl.load(
                    down_e + fs[:, None] * stride_df + ns[None, :] * stride_dh,
                    mask=f_ok[:, None] & n_ok[None, :],
                    other=0.0,
                )  # (BLOCK_F, BLOCK_H) = down[e].T tile
                if FP32_DOT:
                    wd = wd.to(tl.float32)
                acc = tl.dot(a, wd, acc, input_precision="ieee")
            tl.store(
                out_ptr + slot[:, None] * H + ns[None, :],
                acc * weight[:, None],
                mask=row_ok[:, None] & n_ok[None, :],
            )

    _route_tuned = autotuned(_route_kernel, _ROUTE_TUNING, key=("H", "E", "TOP_K", "T_BUCKET"))
    _grouped_swiglu_tuned = autotuned(
        _grouped_swiglu_kernel, _GROUPED_TUNING, key=("H", "F", "BLOCK_M", "FP32_DOT")
    )


# The triton.jit functions the Triton paths launch; None without Triton.
_JIT_KERNELS = (_route_kernel, _grouped_swiglu_kernel) if triton is not None else None


def _ready_for_kernels(name: str, device: torch.device) -> None:
    """Raise a ValueError saying how to fix it unless Triton can run on ``device`` now."""
    require_triton(name, device, _JIT_KERNELS, instead="the *_reference functions (kernels='reference')")


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' (models may span several GPUs)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _fp32_dot(*tensors: torch.Tensor) -> bool:
    """Whether kernels cast tiles to float32 for tl.dot: unless all are the same 16-bit float type.

    A bf16 x bf16 (or fp16 x fp16) product is exact in float32, so tensor-core dots with a float32
    accumulator compute what the float32 reference does, up to summation order.
    """
    dtypes = {t.dtype for t in tensors}
    return not (len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16})


@torch.no_grad()
def route_triton(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> Routing:
    """``route_reference`` in one Triton kernel launch; same arguments, weights within 1e-5.

    The selected experts are the reference's, except where two affinities are closer than float32
    rounding of the logits (then either may be chosen); exact ties go to the lowest index in both.

    Raises:
        ValueError: what ``route_reference`` rejects; more than ``MAX_KERNEL_EXPERTS`` normal experts or
            ``top_k`` above ``MAX_KERNEL_TOP_K``; Triton not installed; tensors neither on CUDA nor on the
            CPU under ``TRITON_INTERPRET=1``.
    """
    _validate_route(x, router_weight, top_k)
    tokens, hidden = x.shape
    experts = router_weight.shape[0]
    if experts > MAX_KERNEL_EXPERTS or top_k > MAX_KERNEL_TOP_K:
        raise ValueError(
            f"the routing kernel takes at most {MAX_KERNEL_EXPERTS} normal experts and top_k <= "
            f"{MAX_KERNEL_TOP_K}, got {experts} and {top_k}. Hint: load the model with kernels='reference'."
        )
    _ready_for_kernels("route_triton", x.device)
    device = x.device
    index = torch.empty((tokens, top_k), dtype=torch.long, device=device)  # (T, K-1)
    weight = torch.empty((tokens, top_k), dtype=torch.float32, device=device)  # (T, K-1)
    shared = torch.empty((tokens,), dtype=torch.float32, device=device)  # (T,)
    if tokens == 0:
        return Routing(index, weight, shared)
    with _on_device(device):
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
            FP32_DOT=_fp32_dot(x, router_weight),
            BLOCK_E=max(_MIN_BLOCK, triton.next_power_of_2(experts)),
        )
    return Routing(index, weight, shared)


def _tile_plan(
    counts: torch.Tensor, block_m: int, rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row tiles of the expert-sorted list, each within one expert's group, computed on the device.

    Args:
        counts: rows per expert, (E,) long.
        block_m: rows per tile.
        rows: M, the length of the sorted list.

    Returns:
        ``(tile_expert, tile_start, tile_end)``, each (G,) long with G an upper bound on the number of tiles
        known without reading ``counts`` on the host (no sync); surplus tiles have ``start == end``.
    """
    experts = counts.shape[0]
    group_end = counts.cumsum(0)  # (E,)
    group_start = group_end - counts  # (E,)
    tiles = (counts + block_m - 1) // block_m  # (E,)
    tiles_end = tiles.cumsum(0)  # (E,) one past each expert's last tile
    grid = min(rows, triton.cdiv(rows, block_m) + experts)  # >= sum(ceil(counts / block_m))
    tile = torch.arange(grid, device=counts.device)  # (G,)
    expert = torch.searchsorted(tiles_end, tile, right=True).clamp_(max=experts - 1)  # (G,)
    start = group_start[expert] + (tile - (tiles_end[expert] - tiles[expert])) * block_m  # (G,)
    end = torch.minimum(start + block_m, group_end[expert])  # (G,) surplus tiles start past group_end
    return expert, start, torch.maximum(end, start)


def _grouped_rows_triton(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    expert_index: torch.Tensor,
    expert_weight: torch.Tensor,
) -> torch.Tensor:
    """Each (token, slot)'s weighted expert output, (T*k, H) float32 in slot order, in one kernel launch."""
    tokens, hidden = x.shape
    experts, ffn, _ = gate.shape
    k = expert_index.shape[1]
    rows = tokens * k
    out = torch.empty((rows, hidden), dtype=torch.float32, device=x.device)  # (M, H)
    if rows == 0:
        return out
    flat = expert_index.reshape(-1)  # (M,) expert of each slot
    slot = torch.argsort(flat, stable=True)  # (M,) slots grouped by expert
    counts = torch.zeros(experts, dtype=torch.long, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    block_m = max(_MIN_BLOCK, min(64, triton.next_power_of_2(triton.cdiv(rows, experts))))
    tile_expert, tile_start, tile_end = _tile_plan(counts, block_m, rows)  # (G,) each
    fp32_dot = _fp32_dot(x, gate, up, down)
    act = torch.empty((rows, ffn), dtype=torch.float32 if fp32_dot else x.dtype, device=x.device)  # (M, F)
    with _on_device(x.device):
        _grouped_swiglu_tuned.launch(
            lambda meta: (tile_expert.shape[0],),
            x,
            gate,
            up,
            down,
            slot,
            expert_weight.reshape(-1).float().contiguous(),
            tile_expert,
            tile_start,
            tile_end,
            act,
            out,
            hidden,
            ffn,
            k,
            x.stride(0),
            x.stride(1),
            *gate.stride(),
            *up.stride(),
            *down.stride(),
            FP32_DOT=fp32_dot,
            BLOCK_M=block_m,
        )
    return out


@torch.no_grad()
def grouped_swiglu_triton(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, routing: Routing
) -> torch.Tensor:
    """``grouped_swiglu_reference`` with one grouped-GEMM Triton launch; same arguments, within 1e-5.

    The kernel writes each (token, slot)'s weighted expert output to its own row, so the sum over a token's
    K-1 slots is a deterministic torch ``sum`` (no atomics, unlike ``index_add_`` on CUDA). For bf16/fp16
    inputs the activation ``silu(gate x) * up x`` is rounded to that dtype before the down projection (as
    transformers' FFNs do); the reference keeps it in float32.

    Raises:
        ValueError: what ``grouped_swiglu_reference`` rejects; Triton not installed; tensors neither on
            CUDA nor on the CPU under ``TRITON_INTERPRET=1``.
    """
    _validate_experts(x, gate, up, down)
    _validate_routing(routing, x.shape[0], gate.shape[0], x.device)
    _ready_for_kernels("grouped_swiglu_triton", x.device)
    tokens, hidden = x.shape
    k = routing.expert_index.shape[1]
    rows = _grouped_rows_triton(x, gate, up, down, routing.expert_index, routing.expert_weight)  # (T*k, H)
    return rows.view(tokens, k, hidden).sum(dim=1).to(x.dtype)  # (T, H)


@torch.no_grad()
def moe_layer_triton(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    shared: Swiglu,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """``moe_layer_reference`` with the Triton routing and grouped kernels; same arguments, within 1e-5.

    The shared expert runs through the grouped kernel too, as a single expert holding every token with
    weight 1 - s_max: float32 accumulation and tensor cores for bf16, with no copy of its weights.
    No host sync: the routing comes from the kernel, so its indices are not checked.

    Raises:
        ValueError: what ``moe_layer_reference`` or ``route_triton`` reject; Triton not installed; tensors
            neither on CUDA nor on the CPU under ``TRITON_INTERPRET=1``.
    """
    _validate_layer(x, router_weight, shared, gate, up, down, top_k)
    _ready_for_kernels("moe_layer_triton", x.device)
    routing = route_triton(x, router_weight, top_k)
    tokens, hidden = x.shape
    routed = _grouped_rows_triton(x, gate, up, down, routing.expert_index, routing.expert_weight)  # (T*k, H)
    shared_gate, shared_up, shared_down = (w.unsqueeze(0) for w in shared)  # (1, F, H), (1, F, H), (1, H, F)
    everyone = torch.zeros((tokens, 1), dtype=torch.long, device=x.device)  # (T, 1)
    shared_out = _grouped_rows_triton(
        x, shared_gate, shared_up, shared_down, everyone, routing.shared_weight[:, None]
    )  # (T, H)
    return (shared_out + routed.view(tokens, top_k, hidden).sum(dim=1)).to(x.dtype)


# --- choosing an implementation -------------------------------------------------------------------------


class _Route(Protocol):
    def __call__(self, x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> Routing: ...


class _GroupedSwiglu(Protocol):
    def __call__(
        self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, routing: Routing
    ) -> torch.Tensor: ...


class _MoeLayer(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        router_weight: torch.Tensor,
        shared: Swiglu,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        top_k: int,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class MoeKernels:
    """One implementation of each MoE step: all references (differentiable) or all Triton (forward only)."""

    route: _Route
    grouped_swiglu: _GroupedSwiglu
    moe_layer: _MoeLayer


REFERENCE_KERNELS = MoeKernels(route_reference, grouped_swiglu_reference, moe_layer_reference)
TRITON_KERNELS = MoeKernels(route_triton, grouped_swiglu_triton, moe_layer_triton)


def select_moe_kernels(
    device: torch.device, kernels: Literal["auto", "triton", "reference"] = "auto"
) -> MoeKernels:
    """The MoE implementation for a model on ``device``, chosen once at load time.

    Args:
        device: where the model (and so its hidden states) lives.
        kernels: ``reference`` (plain torch), ``triton`` (the kernels, or an error saying why they cannot
            run), or ``auto``: Triton on CUDA, the references elsewhere. ``auto`` never falls back
            silently: on CUDA without Triton it raises.

    Returns:
        ``TRITON_KERNELS`` or ``REFERENCE_KERNELS``.

    Raises:
        ValueError: an unknown ``kernels``; Triton asked for (or ``auto`` on CUDA) but not installed;
            ``triton`` on a device that is neither CUDA nor the CPU under ``TRITON_INTERPRET=1``.
    """
    if use_triton(device, kernels, jit_kernels=_JIT_KERNELS):
        return TRITON_KERNELS
    return REFERENCE_KERNELS
