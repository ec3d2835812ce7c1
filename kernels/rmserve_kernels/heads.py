"""The reward heads and every robust aggregate of a batch, fused: a Triton kernel and its torch reference.

This module owns the last step of a forward pass: from each input's pooled hidden state (one row of
``pooled``, (B, H)) to

- the k head rewards ``mu = pooled @ weight.T + bias``, (B, k);
- for BRME models, the k standard deviations ``sigma = softplus(pooled @ std_weight.T + std_bias) + eps``,
  (B, k);
- every aggregate of ``rmserve.names.AGGREGATES`` per input, (B, 7), with per-input lambdas and a
  nominal head that is either fixed or, for BRME, the head with the smallest sigma (the first of equal ones).

``heads_aggregate_reference`` defines the semantics in plain torch (all math in float32, aggregates from
``rmserve.aggregation.aggregate_rows``); ``heads_aggregate_triton`` computes the same in one kernel launch
and matches it to 1e-5. ``select_heads_aggregate`` picks one of the two, once, when a model is loaded.
Both refuse the same arguments with the same messages (``rmserve_kernels.heads_validation``).

Fused pooling. With ``positions`` (B,), both take the backbone's final hidden states (B, T, H), any
strides, instead of pooled rows, and read row b at ``hidden[b, positions[b]]``: the kernel loads each
position and adds one more stride, so the gathered (B, H) copy is never made. ``scored_positions`` gives the
positions of a right- or left-padded batch. The reference checks every position against T (one host sync
on CUDA; it is the definition, and torch would wrap a negative index silently). The kernel does not: that
check would stall the host on the backbone's forward before the launch. Positions in 0..T-1 are the
caller's contract; the kernel never reads outside ``hidden`` for one that is not, and gives that input NaN
for every output instead (which the server's finite check turns into an error for the batch).

Launch configurations (see ``rmserve_kernels.tuning`` for the rules every kernel shares). On CUDA the
kernel is autotuned, keyed on H, k, BRME or not and a power-of-two bucket of B (16..256), over 8 tiles:
16 rows by 32, 64, 128 or 256 hidden columns, 32 rows by 64 or 128, 64 rows by 64 or 128. The problem is a
skinny GEMM, (B, H) by (H, k) with k <= 128, bound by reading the hidden rows and the head weights: 16-row
tiles give a served batch of a few dozen inputs as many programs as possible; 32 and 64 rows read each
weight tile once for more rows when batches are large. Long H chunks (128, 256) with 3-4 stages keep more
loads in flight per program; they only fit a narrow head tile: candidates with ``BLOCK_H * BLOCK_K`` above
4096 elements (a weight tile, twice for BRME, plus the row tile, in registers and shared memory) are pruned
at launch, as are tiles with more rows than the batch bucket. The 16 x 32 tile fits every launch (128 heads
included). Under the interpreter: one tile, 16 rows by 64 columns.

Triton is optional: without it this module still imports and the reference works. The kernel runs on
CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``; float32 only in
practice, the interpreter gets bfloat16 ``tl.dot`` wrong). Triton decides compiled-or-interpreted for the
whole process when it is first imported (its own ``tl.zeros``, ``tl.sum``... are ``triton.jit`` functions
made then), and torch._dynamo, which transformers loads, imports it early; so ``TRITON_INTERPRET`` must be
in the environment before the process starts. Setting it later is refused with a ValueError saying so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from rmserve.aggregation import aggregate_rows
from rmserve.names import AGGREGATES
from rmserve_kernels.heads_validation import check_position_range, is_integer, validate_heads_aggregate
from rmserve_kernels.selection import require_triton, use_triton
from rmserve_kernels.tuning import Tile, TuningSpace, autotuned, size_bucket

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is all there is
    triton = None
    tl = None

__all__ = [
    "MAX_HEADS",
    "HeadOutputs",
    "HeadsAggregate",
    "heads_aggregate_reference",
    "heads_aggregate_triton",
    "scored_positions",
    "select_heads_aggregate",
]

MAX_HEADS = 128
"""The most heads the Triton kernel takes: a program holds (BLOCK_B, next_pow2(k)) tiles in registers."""

_MIN_BLOCK_K = 16  # tl.dot needs >= 16 columns
_TILE_ELEMENTS = 4096  # the most BLOCK_H * BLOCK_K of one weight tile, to bound registers per program


@dataclass(frozen=True)
class HeadOutputs:
    """Per input: the head rewards, the head sigmas (BRME only) and every aggregate.

    Attributes:
        heads: head rewards mu, (B, k) float32.
        head_std: head standard deviations sigma, (B, k) float32; None unless std weights were given.
        aggregates: (B, len(AGGREGATES)) float32, columns in ``rmserve.names.AGGREGATES`` order.
        combined: the model's own reward where it is not an aggregate of the heads (DMoERM), (B,)
            float32; None for every other kind.
        routes: the index of each input's routed category (DMoERM), (B,) long; None otherwise.
    """

    heads: torch.Tensor
    head_std: torch.Tensor | None
    aggregates: torch.Tensor
    combined: torch.Tensor | None = None
    routes: torch.Tensor | None = None


HeadsAggregate = Callable[..., HeadOutputs]
"""``heads_aggregate_reference`` or ``heads_aggregate_triton``: same signature, same results."""


def scored_positions(
    lengths: torch.Tensor, seq_len: int, padding_side: Literal["right", "left"]
) -> torch.Tensor:
    """The position of each sequence's scored token (its last real one) in a padded batch, for ``positions``.

    Right padding puts sequence b at 0..lengths[b]-1, so it is scored at ``lengths[b] - 1``; left padding
    aligns every sequence to the end, so each is scored at ``seq_len - 1`` whatever its length.

    Args:
        lengths: the real tokens of each sequence, (B,) integer, each in 1..seq_len. Not read on the host
            (that would sync CUDA): ``heads_aggregate_reference`` rejects the positions of lengths outside
            that range, the kernel gives those inputs NaN outputs.
        seq_len: T, the padded length of the batch.
        padding_side: ``right`` or ``left``, as the batch was padded.

    Returns:
        (B,) long on ``lengths``'s device.

    Raises:
        ValueError: ``lengths`` not a (B,) integer tensor, ``seq_len`` not an integer >= 0, or an unknown
            ``padding_side``.
    """
    if lengths.ndim != 1 or not is_integer(lengths):
        raise ValueError(
            f"lengths must be a (B,) integer tensor of sequence lengths, got shape {tuple(lengths.shape)} "
            f"and dtype {lengths.dtype}."
        )
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be the padded length T, an integer >= 0, got {seq_len!r}.")
    if padding_side == "right":
        return lengths.long() - 1  # (B,)
    if padding_side == "left":
        return torch.full_like(lengths, seq_len - 1, dtype=torch.long)  # (B,)
    raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")


@torch.no_grad()
def heads_aggregate_reference(
    pooled: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    std_weight: torch.Tensor | None,
    std_bias: torch.Tensor | None,
    *,
    nominal_head: int | None,
    uwo_lambda: torch.Tensor,
    tradeoff_lambda: torch.Tensor,
    eps: float,
    positions: torch.Tensor | None = None,
) -> HeadOutputs:
    """Head rewards, BRME sigmas and every aggregate, in plain torch and float32 (the definition).

    Args:
        pooled: each input's pooled hidden state, (B, H), any float dtype (upcast to float32); with
            ``positions``, the final hidden states (B, T, H), any strides, pooled here.
        weight: mean-head weights, (k, H).
        bias: mean-head biases, (k,), or None.
        std_weight: BRME std-head weights, (k, H), or None for multi-head and dense models.
        std_bias: BRME std-head biases, (k,), or None.
        nominal_head: the nominal head of every input; None picks, per input, the head with the smallest
            sigma (the first of equal ones), which needs ``std_weight``.
        uwo_lambda: each input's UWO lambda, (B,).
        tradeoff_lambda: each input's trade-off lambda, (B,).
        eps: the sigma floor, ``sigma = softplus(std_logit) + eps``.
        positions: the scored token of each input, (B,) integer in 0..T-1 (see ``scored_positions``); row
            b is ``pooled[b, positions[b]]``. None: ``pooled`` is already (B, H).

    Returns:
        ``HeadOutputs`` in float32 on ``pooled``'s device.

    Raises:
        ValueError: shapes that do not match, a nominal head out of range (or None without std weights),
            a negative eps, tensors on another device than ``pooled``, or positions that are not (B,)
            integers in 0..T-1.
    """
    validate_heads_aggregate(
        pooled, weight, bias, std_weight, std_bias, nominal_head, uwo_lambda, tradeoff_lambda, eps, positions
    )
    if positions is not None:
        check_position_range(positions, pooled.shape[1])
        rows = torch.arange(pooled.shape[0], device=pooled.device)  # (B,)
        pooled = pooled[rows, positions.long()]  # (B, H)
    x = pooled.float()  # (B, H)
    with torch.autocast(x.device.type, enabled=False):  # float32 even inside a bfloat16-autocast forward
        mu = x @ weight.float().T  # (B, k)
        logits = None if std_weight is None else x @ std_weight.float().T  # (B, k)
    if bias is not None:
        mu = mu + bias.float()  # (B, k)
    sigma = None
    if logits is not None:
        if std_bias is not None:
            logits = logits + std_bias.float()  # (B, k)
        sigma = F.softplus(logits) + eps  # (B, k)
    if nominal_head is None:
        assert sigma is not None  # _validate guarantees std_weight
        nominal = sigma.argmin(dim=-1)  # (B,) first of ties
    else:
        nominal = torch.full((x.shape[0],), nominal_head, dtype=torch.long, device=x.device)  # (B,)
    return HeadOutputs(mu, sigma, aggregate_rows(mu, nominal, uwo_lambda, tradeoff_lambda))


def _tile_fits(launch: Mapping[str, int]) -> bool:
    """Whether a candidate tile suits a launch: rows within the batch bucket, weight tile within budget."""
    return (
        launch["BLOCK_B"] <= launch["B_BUCKET"]
        and launch["BLOCK_H"] * launch["BLOCK_K"] <= _TILE_ELEMENTS
        and launch["BLOCK_H"] <= max(32, triton.next_power_of_2(launch["H"]))
    )


_TUNING = TuningSpace(
    candidates=(
        Tile({"BLOCK_B": 16, "BLOCK_H": 32}, num_warps=4, num_stages=3),  # fits every launch (k <= 128)
        Tile({"BLOCK_B": 16, "BLOCK_H": 64}, num_warps=4, num_stages=3),
        Tile({"BLOCK_B": 16, "BLOCK_H": 128}, num_warps=4, num_stages=4),
        Tile({"BLOCK_B": 16, "BLOCK_H": 256}, num_warps=4, num_stages=3),
        Tile({"BLOCK_B": 32, "BLOCK_H": 64}, num_warps=4, num_stages=3),
        Tile({"BLOCK_B": 32, "BLOCK_H": 128}, num_warps=4, num_stages=4),
        Tile({"BLOCK_B": 64, "BLOCK_H": 64}, num_warps=8, num_stages=3),
        Tile({"BLOCK_B": 64, "BLOCK_H": 128}, num_warps=8, num_stages=2),
    ),
    interpreter=Tile({"BLOCK_B": 16, "BLOCK_H": 64}),
    dot_sides=("BLOCK_B", "BLOCK_H"),
    fits=_tile_fits,
)
"""The heads kernel's launch configurations (see the module docstring for why these)."""

_B_BUCKETS = (16, 256)  # the autotune key's batch bucket: next power of two of B, clamped to this range

if triton is not None:

    @triton.jit
    def _heads_aggregate_kernel(
        pooled_ptr,  # (B, H), or (B, T, H) if HAS_POSITIONS; any float dtype, any strides
        positions_ptr,  # (B,) int64 contiguous, read only if HAS_POSITIONS
        weight_ptr,  # (K, H)
        bias_ptr,  # (K,) contiguous, read only if HAS_BIAS
        std_weight_ptr,  # (K, H), read only if HAS_STD
        std_bias_ptr,  # (K,) contiguous, read only if HAS_STD_BIAS
        uwo_ptr,  # (B,) contiguous
        tradeoff_ptr,  # (B,) contiguous
        heads_ptr,  # out (B, K) float32 contiguous
        head_std_ptr,  # out (B, K) float32 contiguous, written only if HAS_STD
        aggregates_ptr,  # out (B, 7) float32 contiguous
        B,
        T,  # positions per sequence; 1 unless HAS_POSITIONS
        H,
        K,
        B_BUCKET,  # unused by the program: the autotuner's key, B's power-of-two bucket
        nominal_head,  # fixed nominal index, unused if NOMINAL_ARGMIN
        eps,
        stride_pb,
        stride_pt,  # 0 unless HAS_POSITIONS
        stride_ph,
        stride_wk,
        stride_wh,
        stride_sk,
        stride_sh,
        HAS_POSITIONS: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_STD: tl.constexpr,
        HAS_STD_BIAS: tl.constexpr,
        NOMINAL_ARGMIN: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_B: tl.constexpr,  # tuned
        BLOCK_H: tl.constexpr,  # tuned
    ):
        """Heads, sigmas and every aggregate of BLOCK_B rows, in one pass over their pooled states.

        The fusion: each program reads its BLOCK_B pooled rows once, H chunk by H chunk, and accumulates
        both projections (mean heads and, for BRME, std heads) in float32 registers; the k rewards of a row
        then never leave the program: softplus, the argmin of sigma, mean, variance, min, max and the
        lambda-weighted aggregates are row reductions over the (BLOCK_B, BLOCK_K) tile. Columns >= K are
        padding (BLOCK_K is a power of two >= 16 for tl.dot) and are masked out of every reduction. With
        HAS_POSITIONS the rows are read straight from the (B, T, H) hidden states at each row's position; a
        position outside 0..T-1 is never read, and its row's outputs are NaN.
        """
        pid = tl.program_id(0)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
        cols = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        row_ok = rows < B  # (BLOCK_B,)
        col_ok = cols < K  # (BLOCK_K,)

        # Where each row starts, in int64: B * T * H passes 2**31 for long batches of a wide model.
        row_start = pooled_ptr + rows.to(tl.int64) * stride_pb  # (BLOCK_B,)
        load_ok = row_ok  # (BLOCK_B,)
        if HAS_POSITIONS:
            position = tl.load(positions_ptr + rows, mask=row_ok, other=0)  # (BLOCK_B,) int64
            position_ok = (position >= 0) & (position < T)  # (BLOCK_B,)
            row_start += tl.where(position_ok, position, 0) * stride_pt  # (BLOCK_B,)
            load_ok = row_ok & position_ok  # (BLOCK_B,)

        # Both projections, accumulated over H in float32; tl.dot at IEEE precision (no TF32).
        mu = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)  # (BLOCK_B, BLOCK_K)
        logit = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)  # (BLOCK_B, BLOCK_K)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
            h_ok = hs < H  # (BLOCK_H,)
            x = tl.load(
                row_start[:, None] + hs[None, :] * stride_ph,
                mask=load_ok[:, None] & h_ok[None, :],
                other=0.0,
            ).to(tl.float32)  # (BLOCK_B, BLOCK_H)
            w_mask = h_ok[:, None] & col_ok[None, :]  # (BLOCK_H, BLOCK_K)
            w = tl.load(
                weight_ptr + hs[:, None] * stride_wh + cols[None, :] * stride_wk, mask=w_mask, other=0.0
            ).to(tl.float32)  # (BLOCK_H, BLOCK_K) = weight.T tile
            mu = tl.dot(x, w, mu, input_precision="ieee")  # (BLOCK_B, BLOCK_K)
            if HAS_STD:
                v = tl.load(
                    std_weight_ptr + hs[:, None] * stride_sh + cols[None, :] * stride_sk,
                    mask=w_mask,
                    other=0.0,
                ).to(tl.float32)  # (BLOCK_H, BLOCK_K) = std_weight.T tile
                logit = tl.dot(x, v, logit, input_precision="ieee")  # (BLOCK_B, BLOCK_K)
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_K,)
            mu += b[None, :]  # (BLOCK_B, BLOCK_K)
        if HAS_POSITIONS:  # a row at an invalid position has no state: NaN, never a made-up reward
            mu = tl.where(position_ok[:, None], mu, float("nan"))  # (BLOCK_B, BLOCK_K)
            logit = tl.where(position_ok[:, None], logit, float("nan"))  # (BLOCK_B, BLOCK_K)

        out_mask = row_ok[:, None] & col_ok[None, :]  # (BLOCK_B, BLOCK_K)
        out_offsets = rows[:, None] * K + cols[None, :]  # (BLOCK_B, BLOCK_K)
        tl.store(heads_ptr + out_offsets, mu, mask=out_mask)

        if HAS_STD:
            if HAS_STD_BIAS:
                c = tl.load(std_bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_K,)
                logit += c[None, :]  # (BLOCK_B, BLOCK_K)
            # softplus as torch computes it (beta 1, threshold 20): x above 20, else log1p(exp(x)). exp's
            # argument is clamped (NaN kept) so the branch where() discards cannot overflow; log1p is
            # Goldberg's exact form log(u) * z / (u - 1), u = 1 + z, which keeps tiny sigmas apart.
            z = tl.exp(tl.minimum(logit, 20.0, propagate_nan=tl.PropagateNan.ALL))  # (BLOCK_B, BLOCK_K)
            u = 1.0 + z  # (BLOCK_B, BLOCK_K)
            log1p_z = tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))
            sigma = tl.where(logit > 20.0, logit, log1p_z) + eps  # (BLOCK_B, BLOCK_K)
            tl.store(head_std_ptr + out_offsets, sigma, mask=out_mask)

        # The nominal head: fixed, or the first column holding the row's smallest sigma; like torch.argmin,
        # a NaN sigma counts as the smallest.
        if NOMINAL_ARGMIN:
            s = tl.where(col_ok[None, :], sigma, float("inf"))  # (BLOCK_B, BLOCK_K)
            s_min = tl.min(s, axis=1)  # (BLOCK_B,)
            first_min = tl.min(tl.where(s == s_min[:, None], cols[None, :], BLOCK_K), axis=1)  # (BLOCK_B,)
            first_nan = tl.min(tl.where(s != s, cols[None, :], BLOCK_K), axis=1)  # (BLOCK_B,)
            nominal_col = tl.where(first_nan < BLOCK_K, first_nan, first_min)  # (BLOCK_B,)
        else:
            nominal_col = tl.full((BLOCK_B,), 0, dtype=tl.int32) + nominal_head  # (BLOCK_B,)
        nominal = tl.sum(tl.where(cols[None, :] == nominal_col[:, None], mu, 0.0), axis=1)  # (BLOCK_B,)

        # Row statistics over the K real columns; population variance (divides by K), two-pass.
        mean = tl.sum(tl.where(col_ok[None, :], mu, 0.0), axis=1) / K  # (BLOCK_B,)
        deviation = tl.where(col_ok[None, :], mu - mean[:, None], 0.0)  # (BLOCK_B, BLOCK_K)
        variance = tl.sum(deviation * deviation, axis=1) / K  # (BLOCK_B,)
        worst = tl.min(tl.where(col_ok[None, :], mu, float("inf")), axis=1)  # (BLOCK_B,)
        best = tl.max(tl.where(col_ok[None, :], mu, float("-inf")), axis=1)  # (BLOCK_B,)
        # tl.min / tl.max may skip NaNs on GPUs; torch's propagate them, so a NaN reward is never hidden.
        nan_heads = tl.sum(tl.where(col_ok[None, :] & (mu != mu), 1, 0), axis=1)  # (BLOCK_B,)
        worst = tl.where(nan_heads > 0, float("nan"), worst)  # (BLOCK_B,)
        best = tl.where(nan_heads > 0, float("nan"), best)  # (BLOCK_B,)
        lam_u = tl.load(uwo_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)  # (BLOCK_B,)
        lam_t = tl.load(tradeoff_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)  # (BLOCK_B,)

        # One column per aggregate, in AGGREGATES order: mean, min, max, std, uwo, nominal, tradeoff.
        row_out = aggregates_ptr + rows * 7  # (BLOCK_B,)
        tl.store(row_out + 0, mean, mask=row_ok)
        tl.store(row_out + 1, worst, mask=row_ok)
        tl.store(row_out + 2, best, mask=row_ok)
        tl.store(row_out + 3, tl.sqrt(variance), mask=row_ok)
        tl.store(row_out + 4, mean - lam_u * variance, mask=row_ok)
        tl.store(row_out + 5, nominal, mask=row_ok)
        tl.store(row_out + 6, lam_t * nominal + (1.0 - lam_t) * worst, mask=row_ok)

    _heads_aggregate_tuned = autotuned(
        _heads_aggregate_kernel, _TUNING, key=("H", "K", "HAS_STD", "B_BUCKET")
    )


# The triton.jit functions the Triton path launches; None without Triton.
_JIT_KERNELS = (_heads_aggregate_kernel,) if triton is not None else None


@torch.no_grad()
def heads_aggregate_triton(
    pooled: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    std_weight: torch.Tensor | None,
    std_bias: torch.Tensor | None,
    *,
    nominal_head: int | None,
    uwo_lambda: torch.Tensor,
    tradeoff_lambda: torch.Tensor,
    eps: float,
    positions: torch.Tensor | None = None,
) -> HeadOutputs:
    """``heads_aggregate_reference`` in one Triton kernel launch; same arguments, results within 1e-5.

    With ``positions``, the kernel reads each row from the (B, T, H) ``pooled`` at its position (no gathered
    copy). Positions are checked for shape, dtype and device only, never read on the host: values outside
    0..T-1 are the caller's error, which the kernel reports as NaN outputs for those inputs (see the module
    docstring).

    Raises:
        ValueError: what ``heads_aggregate_reference`` rejects but out-of-range positions; Triton not
            installed; more than ``MAX_HEADS`` heads; tensors that are neither on CUDA nor on the CPU under
            ``TRITON_INTERPRET=1``.
    """
    validate_heads_aggregate(
        pooled, weight, bias, std_weight, std_bias, nominal_head, uwo_lambda, tradeoff_lambda, eps, positions
    )
    rows, hidden = pooled.shape[0], pooled.shape[-1]
    k = weight.shape[0]
    if k > MAX_HEADS:
        raise ValueError(
            f"the Triton kernel takes at most {MAX_HEADS} heads, got {k}. Hint: load the model with "
            "kernels='reference'."
        )
    require_triton("heads_aggregate_triton", pooled.device, _JIT_KERNELS, instead="heads_aggregate_reference")
    device = pooled.device
    heads = torch.empty((rows, k), dtype=torch.float32, device=device)  # (B, k)
    head_std = torch.empty((rows, k), dtype=torch.float32, device=device) if std_weight is not None else None
    aggregates = torch.empty((rows, len(AGGREGATES)), dtype=torch.float32, device=device)  # (B, 7)
    if rows == 0:
        return HeadOutputs(heads, head_std, aggregates)

    if positions is not None:
        seq_len, stride_t = pooled.shape[1], pooled.stride(1)
        positions = positions.to(torch.int64).contiguous()  # (B,)
    else:
        seq_len, stride_t = 1, 0
    std_w = std_weight if std_weight is not None else weight  # placeholder pointer when HAS_STD is False
    # Triton launches on the current CUDA device: make it pooled's (models may sit on several GPUs).
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        _heads_aggregate_tuned.launch(
            lambda meta: (triton.cdiv(rows, meta["BLOCK_B"]),),
            pooled,
            positions if positions is not None else heads,  # placeholders are never read
            weight,
            bias.contiguous() if bias is not None else heads,
            std_w,
            std_bias.contiguous() if std_bias is not None else heads,
            uwo_lambda.contiguous(),
            tradeoff_lambda.contiguous(),
            heads,
            head_std if head_std is not None else heads,
            aggregates,
            rows,
            seq_len,
            hidden,
            k,
            size_bucket(rows, low=_B_BUCKETS[0], high=_B_BUCKETS[1]),
            0 if nominal_head is None else nominal_head,
            float(eps),
            pooled.stride(0),
            stride_t,
            pooled.stride(-1),
            weight.stride(0),
            weight.stride(1),
            std_w.stride(0),
            std_w.stride(1),
            HAS_POSITIONS=positions is not None,
            HAS_BIAS=bias is not None,
            HAS_STD=std_weight is not None,
            HAS_STD_BIAS=std_bias is not None,
            NOMINAL_ARGMIN=nominal_head is None,
            BLOCK_K=max(_MIN_BLOCK_K, triton.next_power_of_2(k)),
        )
    return HeadOutputs(heads, head_std, aggregates)


def select_heads_aggregate(
    device: torch.device, kernels: Literal["auto", "triton", "reference"] = "auto"
) -> HeadsAggregate:
    """The heads-and-aggregates implementation for a model on ``device``, chosen once at load time.

    Args:
        device: where the model (and so the pooled states) lives.
        kernels: ``reference`` (plain torch), ``triton`` (the fused kernel, or an error saying why it
            cannot run), or ``auto``: Triton on CUDA, the reference elsewhere. ``auto`` never falls back
            silently: on CUDA without Triton it raises.

    Returns:
        ``heads_aggregate_triton`` or ``heads_aggregate_reference``.

    Raises:
        ValueError: an unknown ``kernels``; Triton asked for (or ``auto`` on CUDA) but not installed;
            ``triton`` on a device that is neither CUDA nor the CPU under ``TRITON_INTERPRET=1``.
    """
    if use_triton(device, kernels, jit_kernels=_JIT_KERNELS):
        return heads_aggregate_triton
    return heads_aggregate_reference
