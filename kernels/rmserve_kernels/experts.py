"""UMM-RM's routed SwiGLU experts, grouped by expert: a Triton grouped-GEMM kernel and its torch reference.

This module owns the routed experts of one MoE layer that replaces a decoder layer's FFN (UMM-RM, section
3.1, eq. 5-7), on the flattened tokens of a batch, x (T, H), and the ``Routing`` of
``rmserve_kernels.routing``: each token's ``sum_i g_i * down_i(silu(gate_i x) * up_i x)``, computed per
expert on the tokens routed to it (assignments sorted by expert), never per token.
``rmserve_kernels.moe_layer`` adds the shared expert and chooses the implementation.

``grouped_swiglu_reference`` defines the semantics in plain torch, all math in float32, and is
differentiable (training uses it); ``grouped_swiglu_triton`` computes the same with one Triton launch,
forward only, and matches it to 1e-5 in float32. ``rmserve_kernels.moe_layer`` also runs the shared expert
through the helpers here: ``validate_experts``, ``swiglu_f32`` and ``grouped_reference_f32`` (reference),
``grouped_rows_triton`` (kernel).

Launch configurations (the rules every kernel shares are in ``rmserve_kernels.tuning``). On CUDA the kernel
is autotuned, keyed on H, F and the row tile ``BLOCK_M``, over 7 (BLOCK_F, BLOCK_H) tiles from 32 x 32 to
128 x 128. ``BLOCK_M`` (16..64, from the rows per expert) is not tuned: the host plans the row tiles of
each expert's group with it before the launch. Phase 1 holds two (BLOCK_M, BLOCK_F) accumulators and two
(BLOCK_H, BLOCK_F) weight tiles, phase 2 a (BLOCK_M, BLOCK_H) one: launches prune tiles where any of these
passes 8192 elements, or wider than F or H (rounded up to a power of two, at least 32). Wide tiles with 8
warps suit the large FFNs of 7B-class models (F ~ 11008-14336), 64 x 64 with 3-4 stages the mid-sized
ones; 32 x 32 fits every launch. Interpreter: 64 x 64.

Triton is optional: without it this module imports and the reference works. The kernel runs on CUDA
tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` exported before the process
starts, float32 only: see ``rmserve_kernels.heads`` for why the mode cannot change later).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from rmserve_kernels._moe_shared import (
    MIN_BLOCK,
    check_devices,
    check_float,
    needs_fp32_dot,
    np2,
    on_device,
    ready_for_kernels,
)
from rmserve_kernels.routing import Routing
from rmserve_kernels.tuning import Tile, TuningSpace, autotuned

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is all there is
    triton = None
    tl = None

__all__ = ["grouped_swiglu_reference", "grouped_swiglu_triton"]


def validate_experts(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(
            f"x must be a (T, H) floating tensor, one row per token, got shape {tuple(x.shape)} and dtype "
            f"{x.dtype}; flatten a (B, S, H) batch with x.reshape(-1, H)."
        )
    hidden = x.shape[1]
    check_float("gate", gate, (-1, -1, hidden), "E normal experts' (F, H) gate projections")
    experts, ffn, _ = gate.shape
    if experts < 1 or ffn < 1:
        raise ValueError(f"gate is {tuple(gate.shape)}: the experts need E >= 1 and F >= 1.")
    check_float("up", up, (experts, ffn, hidden), "stacked like gate")
    check_float("down", down, (experts, hidden, ffn), "each expert's (H, F) down projection")
    check_devices(x, {"gate": gate, "up": up, "down": down})


def _validate_routing(routing: Routing, tokens: int, experts: int, device: torch.device) -> None:
    """Shapes, dtypes and devices of ``routing``, and (one host sync) that its indices are experts."""
    index = routing.expert_index
    if index.ndim != 2 or index.shape[0] != tokens or index.shape[1] < 1 or index.dtype != torch.long:
        raise ValueError(
            f"routing.expert_index must be a ({tokens}, K-1) long tensor, got shape {tuple(index.shape)} and "
            f"dtype {index.dtype}; build the routing with route_reference or route_triton."
        )
    check_float("routing.expert_weight", routing.expert_weight, tuple(index.shape), "one weight per index")
    check_float("routing.shared_weight", routing.shared_weight, (tokens,), "one per token")
    for name in ("expert_index", "expert_weight", "shared_weight"):
        if getattr(routing, name).device != device:
            raise ValueError(f"routing.{name} is not on x's device {device}; move it with .to(x.device).")
    if index.numel() and bool(((index < 0) | (index >= experts)).any()):
        raise ValueError(
            f"routing.expert_index holds values outside 0..{experts - 1}, but there are {experts} normal "
            "experts; route with the router of this layer."
        )


def swiglu_f32(x32: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x) in float32: x32 (n, H) float32, gate/up (F, H), down (H, F) -> (n, H)."""
    hidden = F.silu(x32 @ gate.float().T) * (x32 @ up.float().T)  # (n, F)
    return hidden @ down.float().T  # (n, H)


def grouped_reference_f32(
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
            y = swiglu_f32(x32[rows], gate[expert], up[expert], down[expert])  # (n, H)
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
    validate_experts(x, gate, up, down)
    _validate_routing(routing, x.shape[0], gate.shape[0], x.device)
    return grouped_reference_f32(x, gate, up, down, routing).to(x.dtype)


def _grouped_tile_fits(launch: Mapping[str, int]) -> bool:
    """Whether a grouped SwiGLU tile suits a launch (see the module docstring)."""
    block_m, block_f, block_h = launch["BLOCK_M"], launch["BLOCK_F"], launch["BLOCK_H"]
    return (
        max(block_m * block_f, block_m * block_h, block_f * block_h) <= 8192
        and block_f <= max(32, np2(launch["F"]))
        and block_h <= max(32, np2(launch["H"]))
    )


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

    _grouped_swiglu_tuned = autotuned(
        _grouped_swiglu_kernel, _GROUPED_TUNING, key=("H", "F", "BLOCK_M", "FP32_DOT")
    )


# The triton.jit functions grouped_swiglu_triton launches; None without Triton.
JIT_KERNELS = (_grouped_swiglu_kernel,) if triton is not None else None


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


def grouped_rows_triton(
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
    block_m = max(MIN_BLOCK, min(64, triton.next_power_of_2(triton.cdiv(rows, experts))))
    tile_expert, tile_start, tile_end = _tile_plan(counts, block_m, rows)  # (G,) each
    fp32_dot = needs_fp32_dot(x, gate, up, down)
    act = torch.empty((rows, ffn), dtype=torch.float32 if fp32_dot else x.dtype, device=x.device)  # (M, F)
    with on_device(x.device):
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
    validate_experts(x, gate, up, down)
    _validate_routing(routing, x.shape[0], gate.shape[0], x.device)
    ready_for_kernels("grouped_swiglu_triton", x.device, JIT_KERNELS)
    tokens, hidden = x.shape
    k = routing.expert_index.shape[1]
    rows = grouped_rows_triton(x, gate, up, down, routing.expert_index, routing.expert_weight)  # (T*k, H)
    return rows.view(tokens, k, hidden).sum(dim=1).to(x.dtype)  # (T, H)
