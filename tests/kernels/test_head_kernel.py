"""The fused heads-and-aggregates Triton kernel against its torch reference, and the reference by hand.

The kernel tests take ``kernel_device``: the GPU, else Triton's interpreter (see tests/interpreter.py).
"""

from __future__ import annotations

import importlib
import math
import sys
from typing import Any

import pytest
import torch

import rmserve_kernels
import rmserve_kernels.heads
from rmserve.names import AGGREGATES
from rmserve_kernels.heads import (
    MAX_HEADS,
    HeadOutputs,
    heads_aggregate_reference,
    heads_aggregate_triton,
    scored_positions,
    select_heads_aggregate,
)
from rmserve_kernels.tuning import MIN_DOT_SIDE, Tile, TuningSpace, size_bucket, tuning_configs
from tests.interpreter import (
    INTERPRETING,
    assert_autotuned_only_when_compiled,
    launch_candidate_alone,
    needs_triton,
    rerun_in_the_interpreter,
)

COLUMN = {name: i for i, name in enumerate(AGGREGATES)}


def make_inputs(
    rows: int,
    hidden: int,
    k: int,
    *,
    seed: int,
    bias: bool = True,
    std: bool = False,
    nominal_head: int | None = 0,
    weight_scale: float | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``heads_aggregate_*``: pooled ~ N(0, 1), heads at nn.Linear's scale.

    Weights default to N(0, 1/H) (the scale of nn.Linear's init and of trained reward heads), so rewards
    are O(1) and float32 rounding of the H-term dot products stays far below 1e-5.
    """
    g = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(hidden) if weight_scale is None else weight_scale
    return {
        "pooled": torch.randn(rows, hidden, generator=g),  # (B, H)
        "weight": torch.randn(k, hidden, generator=g) * scale,  # (k, H)
        "bias": torch.randn(k, generator=g) if bias else None,  # (k,)
        "std_weight": torch.randn(k, hidden, generator=g) * scale if std else None,  # (k, H)
        "std_bias": torch.randn(k, generator=g) if std else None,  # (k,)
        "nominal_head": nominal_head,
        "uwo_lambda": torch.rand(rows, generator=g) * 2,  # (B,) a different lambda per input
        "tradeoff_lambda": torch.rand(rows, generator=g),  # (B,)
        "eps": 1e-6,
    }


def assert_matches(out: HeadOutputs, ref: HeadOutputs, *, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Every output of the kernel equals the reference's (assert_close reports max abs / rel errors)."""
    torch.testing.assert_close(out.heads, ref.heads, rtol=rtol, atol=atol, msg=lambda m: f"heads: {m}")
    assert (out.head_std is None) == (ref.head_std is None)
    if ref.head_std is not None:
        torch.testing.assert_close(
            out.head_std, ref.head_std, rtol=rtol, atol=atol, msg=lambda m: f"head_std: {m}"
        )
    torch.testing.assert_close(
        out.aggregates, ref.aggregates, rtol=rtol, atol=atol, msg=lambda m: f"aggregates: {m}"
    )
    assert out.aggregates.shape == (ref.heads.shape[0], len(AGGREGATES))


def run_both(inputs: dict[str, Any], device: torch.device) -> tuple[HeadOutputs, HeadOutputs]:
    """The kernel's and the reference's outputs on the same inputs, on ``device``."""
    on_device = {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in inputs.items()}
    return heads_aggregate_triton(**on_device), heads_aggregate_reference(**on_device)


# --- the reference ------------------------------------------------------------------------------------


def test_reference_on_a_hand_computed_example():
    out = heads_aggregate_reference(
        torch.tensor([[1.0, 2.0], [0.0, -1.0]]),  # (B=2, H=2)
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),  # (k=3, H=2)
        torch.tensor([0.0, 1.0, -1.0]),
        torch.zeros(3, 2),  # sigma comes from std_bias alone
        torch.tensor([0.0, -1.0, -1.0]),  # heads 1 and 2 tie for the smallest sigma: head 1 wins
        nominal_head=None,
        uwo_lambda=torch.tensor([0.5, 1.0]),
        tradeoff_lambda=torch.tensor([0.25, 1.0]),
        eps=0.5,
    )
    # mu: row 0 = [1, 3, 2] (mean 2, variance 2/3); row 1 = [0, 0, -2] (mean -2/3, variance 8/9)
    assert out.heads.tolist() == [[1.0, 3.0, 2.0], [0.0, 0.0, -2.0]]
    sigma = [math.log(2) + 0.5, math.log1p(math.exp(-1)) + 0.5, math.log1p(math.exp(-1)) + 0.5]
    torch.testing.assert_close(out.head_std, torch.tensor([sigma, sigma]))
    expected = [
        # mean, min, max, std, uwo, nominal, tradeoff
        [2.0, 1.0, 3.0, math.sqrt(2 / 3), 2.0 - 0.5 * 2 / 3, 3.0, 0.25 * 3.0 + 0.75 * 1.0],
        [-2 / 3, -2.0, 0.0, math.sqrt(8 / 9), -2 / 3 - 8 / 9, 0.0, 0.0],
    ]
    torch.testing.assert_close(out.aggregates, torch.tensor(expected))
    assert out.aggregates.dtype == torch.float32


def test_reference_upcasts_bfloat16_to_float32():
    inputs = make_inputs(4, 32, 3, seed=1, std=True, nominal_head=None)
    low = {
        name: value.bfloat16() if name in ("pooled", "weight", "std_weight") else value
        for name, value in inputs.items()
    }
    out = heads_aggregate_reference(**low)
    # bfloat16 -> float32 is exact, so this is the float32 reference on the rounded inputs, bit for bit.
    upcast = {
        name: value.float() if isinstance(value, torch.Tensor) else value for name, value in low.items()
    }
    ref = heads_aggregate_reference(**upcast)
    assert out.heads.dtype == out.head_std.dtype == out.aggregates.dtype == torch.float32
    assert torch.equal(out.heads, ref.heads) and torch.equal(out.aggregates, ref.aggregates)


def test_reference_fixed_nominal_head_wins_over_sigma():
    out = heads_aggregate_reference(**make_inputs(6, 16, 4, seed=2, std=True, nominal_head=2))
    assert torch.equal(out.aggregates[:, COLUMN["nominal"]], out.heads[:, 2])


def _drop(name: str):
    return lambda a: a.update({name: None})


def _set(name: str, value):
    return lambda a: a.update({name: value() if callable(value) else value})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("pooled", lambda: torch.zeros(8)), r"pooled must be a \(B, H\) floating tensor"),
        (_set("pooled", lambda: torch.zeros(3, 8, dtype=torch.long)), "pooled must be a .* floating"),
        (_set("weight", lambda: torch.zeros(2, 9)), "the heads must read the backbone's hidden size"),
        (_set("weight", lambda: torch.zeros(0, 8)), r"at least one head \(k >= 1\)"),
        (_set("bias", lambda: torch.zeros(3)), r"bias must be a floating \(2,\) tensor"),
        (
            _set("std_weight", lambda: torch.zeros(3, 8)),
            "std_weight must be a floating tensor shaped like weight",
        ),
        (_drop("std_weight"), "std_bias was given without std_weight"),
        (_set("nominal_head", 2), "nominal_head=2 is not a head index; use 0..1"),
        (_set("nominal_head", -1), "nominal_head=-1 is not a head index"),
        (lambda a: a.update(std_weight=None, std_bias=None), "nominal_head=None .* needs std_weight"),
        (_set("eps", -1e-3), "eps .* must be a finite number >= 0"),
        (_set("eps", math.nan), "eps .* must be a finite number >= 0"),
        (_set("uwo_lambda", lambda: torch.ones(2)), r"uwo_lambda must be \(3,\), one per input"),
        (_set("tradeoff_lambda", lambda: torch.ones(3, 1)), r"tradeoff_lambda must be \(3,\)"),
        (
            _set("bias", lambda: torch.zeros(2, device="meta")),
            r"bias is on meta but pooled is on cpu; move it",
        ),
    ],
)
def test_invalid_inputs_say_what_to_fix(change, message):
    inputs = make_inputs(3, 8, 2, seed=0, std=True, nominal_head=None)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        heads_aggregate_reference(**inputs)


# --- choosing an implementation -----------------------------------------------------------------------


def test_select_on_cpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert select_heads_aggregate(cpu) is heads_aggregate_reference
    assert select_heads_aggregate(cpu, "auto") is heads_aggregate_reference
    assert select_heads_aggregate(cpu, "reference") is heads_aggregate_reference
    with pytest.raises(ValueError, match="kernels must be 'auto', 'triton' or 'reference'"):
        select_heads_aggregate(cpu, "fast")  # type: ignore[arg-type]


@needs_triton
def test_select_triton_on_cpu_without_the_interpreter_says_how_to_fix(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"needs a CUDA device, got cpu\. Hint: .*TRITON_INTERPRET=1"):
        select_heads_aggregate(torch.device("cpu"), "triton")
    with pytest.raises(ValueError, match="the Triton kernel needs CUDA tensors, got cpu"):
        heads_aggregate_triton(**make_inputs(2, 8, 2, seed=0))


def test_select_triton_where_it_can_run(kernel_device):
    assert select_heads_aggregate(kernel_device, "triton") is heads_aggregate_triton
    # Selection looks at the device type only: torch.device("cuda") needs no GPU.
    assert select_heads_aggregate(torch.device("cuda"), "auto") is heads_aggregate_triton
    assert select_heads_aggregate(torch.device("cpu"), "auto") is heads_aggregate_reference


@needs_triton
def test_triton_imported_in_the_other_mode_is_refused(monkeypatch: pytest.MonkeyPatch):
    # Flip TRITON_INTERPRET against the mode this process's triton was imported in.
    if INTERPRETING:
        monkeypatch.delenv("TRITON_INTERPRET")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"fixes interpreting-or-compiling at import\. Hint: export"):
        select_heads_aggregate(torch.device("cuda"), "triton")


def test_without_triton_the_module_imports_and_never_falls_back_silently(monkeypatch: pytest.MonkeyPatch):
    # A fresh copy of the module on an install without triton; the original is put back afterwards.
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.delitem(sys.modules, "rmserve_kernels.heads")
    monkeypatch.setattr(rmserve_kernels, "heads", rmserve_kernels.heads)
    fresh = importlib.import_module("rmserve_kernels.heads")
    assert fresh.triton is None
    cuda = torch.device("cuda")
    assert fresh.select_heads_aggregate(torch.device("cpu"), "auto") is fresh.heads_aggregate_reference
    assert fresh.select_heads_aggregate(cuda, "reference") is fresh.heads_aggregate_reference
    for kernels in ("auto", "triton"):
        with pytest.raises(ValueError, match=r"pip install 'rmserve\[gpu\]'.*kernels='reference'"):
            fresh.select_heads_aggregate(cuda, kernels)
    inputs = make_inputs(2, 8, 2, seed=0)
    with pytest.raises(ValueError, match="needs Triton, which is not installed"):
        fresh.heads_aggregate_triton(**inputs)
    assert fresh.heads_aggregate_reference(**inputs).aggregates.shape == (2, len(AGGREGATES))


# Without a GPU, and unless TRITON_INTERPRET=1 was exported, the kernel_device tests run in a child pytest.
test_kernel_tests_in_the_triton_interpreter = rerun_in_the_interpreter


# --- the kernel against the reference (GPU, or Triton's interpreter in float32) ---------------------


@pytest.mark.parametrize("bias", [True, False])
def test_multihead_k5_matches_reference(kernel_device, bias):
    # B = 37 is not a multiple of the 16-row block; lambdas differ per row.
    assert_matches(*run_both(make_inputs(37, 576, 5, seed=10, bias=bias, nominal_head=2), kernel_device))


@pytest.mark.parametrize("nominal_head", [None, 3])
def test_brme_k5_matches_reference(kernel_device, nominal_head):
    inputs = make_inputs(37, 576, 5, seed=11, std=True, nominal_head=nominal_head)
    out, ref = run_both(inputs, kernel_device)
    assert_matches(out, ref)
    if nominal_head is None:  # the nominal head really varies per row, so argmin is exercised
        assert ref.head_std.argmin(dim=-1).unique().numel() > 1


def test_brme_without_std_bias_and_hidden_1024(kernel_device):
    inputs = make_inputs(21, 1024, 5, seed=12, std=True, nominal_head=None)
    inputs["std_bias"] = None
    assert_matches(*run_both(inputs, kernel_device))


def test_one_head_every_aggregate_is_the_reward(kernel_device):
    out, ref = run_both(make_inputs(5, 64, 1, seed=13, nominal_head=0), kernel_device)
    assert_matches(out, ref)
    reward = out.heads[:, 0]  # (B,)
    for name in ("mean", "min", "max", "uwo", "nominal", "tradeoff"):
        torch.testing.assert_close(out.aggregates[:, COLUMN[name]], reward, msg=name)
    assert torch.equal(out.aggregates[:, COLUMN["std"]], torch.zeros(5))


def test_ties_in_sigma_pick_the_first_tied_head(kernel_device):
    # Small integers everywhere: every dot product is exact in float32 whatever the summation order,
    # so heads 1 and 3 have bit-identical sigmas (their std rows are equal) and really tie.
    g = torch.Generator().manual_seed(14)
    rows, hidden = 24, 32
    std_weight = torch.randint(-2, 3, (5, hidden), generator=g).float()  # (k, H)
    std_weight[3] = std_weight[1]
    inputs = {
        "pooled": torch.randint(-3, 4, (rows, hidden), generator=g).float(),  # (B, H)
        "weight": torch.zeros(5, hidden),
        "bias": torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0]),  # distinct rewards name the nominal head
        "std_weight": std_weight,
        "std_bias": torch.tensor([0.0, -6.0, 0.0, -6.0, 0.0]),
        "nominal_head": None,
        "uwo_lambda": torch.ones(rows),
        "tradeoff_lambda": torch.full((rows,), 0.5),
        "eps": 1e-6,
    }
    out, ref = run_both(inputs, kernel_device)
    assert_matches(out, ref)
    assert torch.equal(out.head_std[:, 1], out.head_std[:, 3])
    chosen = out.aggregates[:, COLUMN["nominal"]]  # (B,)
    assert torch.equal(chosen, ref.aggregates[:, COLUMN["nominal"]])
    tied_minimum = ref.head_std.argmin(dim=-1) == 1  # (B,) rows where heads 1 and 3 share the minimum
    assert tied_minimum.sum() >= 3
    assert torch.all(chosen[tied_minimum] == 20.0)  # head 1, never head 3 (40)
    assert not torch.any(chosen == 40.0)


def test_softplus_tails_and_threshold(kernel_device):
    # Logits straight from std_bias: tiny sigmas (exp(-40) vs exp(-30): 1 + exp(x) rounds to 1 in
    # float32, so only an exact log1p keeps them apart and picks the right nominal head) and both sides
    # of softplus's threshold (20).
    inputs = make_inputs(3, 16, 6, seed=15, std=True, nominal_head=None)
    inputs["std_weight"] = torch.zeros(6, 16)
    inputs["std_bias"] = torch.tensor([-30.0, -40.0, 19.5, 20.5, 0.0, -60.0])
    inputs["eps"] = 0.0
    out, ref = run_both(inputs, kernel_device)
    torch.testing.assert_close(out.head_std, ref.head_std, rtol=1e-5, atol=0.0)  # relative even at 1e-26
    assert_matches(out, ref)
    assert torch.all(out.aggregates[:, COLUMN["nominal"]] == out.heads[:, 5])


def test_nan_propagates_as_in_torch(kernel_device):
    # A NaN reward (head 3) makes min, max, mean... NaN; a NaN sigma (head 1) is the smallest, as for
    # torch.argmin, so head 1 is nominal. A NaN pooled state (row 0) makes the whole row NaN.
    inputs = make_inputs(4, 32, 5, seed=18, std=True, nominal_head=None)
    inputs["bias"][3] = math.nan
    inputs["std_bias"][1] = math.nan
    inputs["pooled"][0, 7] = math.nan
    out, ref = run_both(inputs, kernel_device)
    for got, want in ((out.heads, ref.heads), (out.head_std, ref.head_std), (out.aggregates, ref.aggregates)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(out.aggregates[1:, COLUMN["nominal"]], out.heads[1:, 1])
    assert out.aggregates[:, COLUMN["min"]].isnan().all() and out.aggregates[0].isnan().all()


def test_large_magnitudes(kernel_device):
    # pooled ~ 1e3 and rewards ~ 1e4..1e5 (bias 5e4, spread 2e4); uwo is ~ -1e8 (the variance).
    # float32 holds ~7 significant digits and the rounding error of a dot product is relative to the
    # size of its terms, not of its result, so an absolute 1e-5 means nothing here: compare with
    # rtol=1e-5 and an atol of one part in a million of the largest reward (~0.1).
    inputs = make_inputs(19, 576, 5, seed=16, std=True, nominal_head=None, weight_scale=20 / math.sqrt(576))
    inputs["pooled"] = inputs["pooled"] * 1e3
    inputs["bias"] = inputs["bias"] * 1e3 + 5e4
    out, ref = run_both(inputs, kernel_device)
    assert ref.heads.abs().max() > 1e4
    assert_matches(out, ref, rtol=1e-5, atol=1e-6 * ref.heads.abs().max().item())


def test_unit_variance_weights(kernel_device):
    # Weights ~ N(0, 1) (not nn.Linear's N(0, 1/H)) give rewards ~ +-sqrt(H) = +-32 whose float32 dot
    # products carry ~1e-5 of rounding in any implementation, torch's included: a reward near 0 cannot
    # match to an absolute 1e-5. Same rule as for large magnitudes: atol ~ 1e-6 of the largest reward.
    out, ref = run_both(
        make_inputs(37, 1024, 5, seed=17, std=True, nominal_head=None, weight_scale=1.0), kernel_device
    )
    assert_matches(out, ref, rtol=1e-5, atol=1e-6 * ref.heads.abs().max().item())


@pytest.mark.parametrize("k", [3, 7, 20, 64])
def test_head_counts_that_are_not_a_block(kernel_device, k):
    assert_matches(*run_both(make_inputs(19, 96, k, seed=20 + k, std=True, nominal_head=None), kernel_device))


def test_one_row_and_an_empty_batch(kernel_device):
    assert_matches(*run_both(make_inputs(1, 576, 5, seed=30, std=True, nominal_head=None), kernel_device))
    out, ref = run_both(make_inputs(0, 32, 4, seed=31, std=True, nominal_head=None), kernel_device)
    assert_matches(out, ref)
    assert out.heads.shape == out.head_std.shape == (0, 4) and out.aggregates.shape == (0, len(AGGREGATES))


def test_strided_pooled_rows(kernel_device):
    # The last position of a (B, T, H) hidden-state tensor: a view with row stride T * H.
    inputs = make_inputs(9, 80, 4, seed=32, std=True, nominal_head=None)
    inputs = {name: v.to(kernel_device) if isinstance(v, torch.Tensor) else v for name, v in inputs.items()}
    hidden_states = torch.randn(9, 3, 80, device=kernel_device)  # (B, T, H)
    hidden_states[:, -1] = inputs["pooled"]
    inputs["pooled"] = hidden_states[:, -1]  # (B, H), strides (T * H, 1)
    assert not inputs["pooled"].is_contiguous()
    assert_matches(heads_aggregate_triton(**inputs), heads_aggregate_reference(**inputs))


def test_too_many_heads_for_the_kernel():
    with pytest.raises(ValueError, match=f"at most {MAX_HEADS} heads.*kernels='reference'"):
        heads_aggregate_triton(**make_inputs(2, 16, MAX_HEADS + 1, seed=33))


# --- fused pooling: positions into (B, T, H) hidden states ----------------------------------------------


def make_hidden_states(rows: int, seq_len: int, hidden: int, *, seed: int, layout: str) -> torch.Tensor:
    """(B, T, H) float32 hidden states ~ N(0, 1), laid out in memory as ``layout`` says.

    ``contiguous``; ``transposed``: a (T, B, H) tensor seen as (B, T, H) (batch stride H); ``columns``: H
    is the slowest dimension of each row (hidden stride T); ``sliced``: every other column of a wider
    tensor, from position 2 of a longer one (hidden stride 2, an offset into storage).
    """
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return torch.randn(rows, seq_len, hidden, generator=g)
    if layout == "transposed":
        return torch.randn(seq_len, rows, hidden, generator=g).transpose(0, 1)
    if layout == "columns":
        return torch.randn(rows, hidden, seq_len, generator=g).transpose(1, 2)
    if layout == "sliced":
        return torch.randn(rows, seq_len + 2, 2 * hidden, generator=g)[:, 2:, ::2]
    raise AssertionError(layout)


def make_fused_inputs(
    rows: int,
    seq_len: int,
    hidden: int,
    k: int,
    *,
    seed: int,
    padding: str = "right",
    std: bool = False,
    layout: str = "contiguous",
) -> dict[str, Any]:
    """``make_inputs`` with (B, T, H) hidden states as ``pooled`` and the positions of a padded batch.

    Lengths are random in 1..T, the first one T (the longest sequence sets T, as when padding a batch).
    """
    inputs = make_inputs(rows, hidden, k, seed=seed, std=std, nominal_head=None if std else k // 2)
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(1, seq_len + 1, (rows,), generator=g)  # (B,)
    lengths[:1] = seq_len
    states = make_hidden_states(rows, seq_len, hidden, seed=seed + 2, layout=layout)  # (B, T, H)
    return inputs | {"pooled": states, "positions": scored_positions(lengths, seq_len, padding)}


def gathered(inputs: dict[str, Any]) -> dict[str, Any]:
    """The same inputs with the hidden states gathered at the positions by hand: (B, H), no positions."""
    states, positions = inputs["pooled"], inputs["positions"]
    rows = torch.arange(states.shape[0], device=states.device)  # (B,)
    return {**inputs, "pooled": states[rows, positions], "positions": None}


def test_scored_positions_right_and_left_padding():
    lengths = torch.tensor([3, 1, 5, 5])  # (B,)
    right = scored_positions(lengths, 5, "right")
    assert right.tolist() == [2, 0, 4, 4] and right.dtype == torch.long
    left = scored_positions(lengths, 5, "left")
    assert left.tolist() == [4, 4, 4, 4] and left.dtype == torch.long
    assert scored_positions(lengths.int(), 5, "right").dtype == torch.long  # any integer lengths
    assert scored_positions(torch.tensor([1]), 1, "left").tolist() == [0]
    assert scored_positions(torch.zeros(0, dtype=torch.long), 0, "right").shape == (0,)


def test_scored_positions_index_the_last_real_token_of_a_padded_batch():
    # Token ids padded by hand with -1: the scored position holds each sequence's last real id.
    sequences = [[5, 6, 7], [8], [1, 2, 3, 4]]
    lengths = torch.tensor([len(s) for s in sequences])  # (B,)
    right = torch.tensor([s + [-1] * (4 - len(s)) for s in sequences])  # (B, T)
    left = torch.tensor([[-1] * (4 - len(s)) + s for s in sequences])  # (B, T)
    rows = torch.arange(3)
    for padding, ids in (("right", right), ("left", left)):
        assert ids[rows, scored_positions(lengths, 4, padding)].tolist() == [7, 8, 4], padding


@pytest.mark.parametrize(
    ("lengths", "seq_len", "padding", "message"),
    [
        (torch.tensor([1.0, 2.0]), 2, "right", r"lengths must be a \(B,\) integer tensor"),
        (torch.tensor([True]), 1, "right", r"lengths must be a \(B,\) integer tensor"),
        (torch.ones(2, 1, dtype=torch.long), 2, "right", r"lengths must be a \(B,\) integer tensor"),
        (torch.ones(2, dtype=torch.long), -1, "right", "seq_len must be the padded length T"),
        (torch.ones(2, dtype=torch.long), 2.0, "right", "seq_len must be the padded length T"),
        (torch.ones(2, dtype=torch.long), 2, "center", "padding_side must be 'right' or 'left'"),
    ],
)
def test_scored_positions_invalid_arguments_say_what_to_fix(lengths, seq_len, padding, message):
    with pytest.raises(ValueError, match=message):
        scored_positions(lengths, seq_len, padding)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "columns", "sliced"])
@pytest.mark.parametrize("std", [False, True])
def test_fused_pooling_reference_is_gather_then_heads_exactly(padding, layout, std):
    inputs = make_fused_inputs(11, 9, 24, 5, seed=40, padding=padding, std=std, layout=layout)
    fused, plain = heads_aggregate_reference(**inputs), heads_aggregate_reference(**gathered(inputs))
    assert torch.equal(fused.heads, plain.heads) and torch.equal(fused.aggregates, plain.aggregates)
    assert (fused.head_std is None) == (not std)
    if std:
        assert torch.equal(fused.head_std, plain.head_std)


def test_fused_pooling_reference_accepts_any_integer_positions_and_bfloat16_states():
    inputs = make_fused_inputs(6, 5, 16, 3, seed=41, std=True)
    want = heads_aggregate_reference(**inputs)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        out = heads_aggregate_reference(**{**inputs, "positions": inputs["positions"].to(dtype)})
        assert torch.equal(out.aggregates, want.aggregates), dtype
    low = {**inputs, "pooled": inputs["pooled"].bfloat16()}
    up = {**inputs, "pooled": low["pooled"].float()}
    assert torch.equal(heads_aggregate_reference(**low).heads, heads_aggregate_reference(**up).heads)


def _positions(value):
    return lambda a: a.update(positions=value() if callable(value) else value)


SHAPE_ERRORS = [
    (_positions(lambda: torch.zeros(4, dtype=torch.long)), r"positions must be a \(3,\) integer tensor"),
    (_positions(lambda: torch.zeros(3, 1, dtype=torch.long)), r"positions must be a \(3,\) integer tensor"),
    (_positions(lambda: torch.zeros(3)), r"positions must be a \(3,\) integer .* dtype torch\.float32"),
    (_positions(lambda: torch.zeros(3, dtype=torch.bool)), r"positions must be a \(3,\) integer tensor"),
    (
        _positions(lambda: torch.zeros(3, dtype=torch.long, device="meta")),
        "positions is on meta but pooled is on cpu; move it",
    ),
    (_set("pooled", lambda: torch.zeros(3, 8)), r"with positions, pooled must be the \(B, T, H\) floating"),
    (
        _set("pooled", lambda: torch.zeros(3, 4, 8, dtype=torch.long)),
        r"with positions, pooled must be the \(B, T, H\) floating",
    ),
    (_set("pooled", lambda: torch.zeros(3, 0, 8)), r"T=0\) have no token to score"),
    (_positions(None), r"pooled must be a \(B, H\) .* pass positions= \(see scored_positions\)"),
]


@pytest.mark.parametrize(("change", "message"), SHAPE_ERRORS)
def test_invalid_positions_say_what_to_fix(change, message):
    inputs = make_fused_inputs(3, 4, 8, 2, seed=42, std=True)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        heads_aggregate_reference(**inputs)
    # The kernel checks the same before anything else (no GPU or interpreter needed to get there).
    with pytest.raises(ValueError, match=message):
        heads_aggregate_triton(**inputs)


@pytest.mark.parametrize(("bad", "low", "high"), [(-1, -1, 3), (4, 0, 4), (100, 0, 100)])
def test_reference_rejects_positions_outside_the_sequence(bad, low, high):
    inputs = make_fused_inputs(3, 4, 8, 2, seed=43)
    inputs["positions"] = torch.tensor([0, 3, bad])
    with pytest.raises(ValueError, match=rf"positions hold values from {low} to {high}, .* T=4 positions"):
        heads_aggregate_reference(**inputs)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("rows", [0, 1, 37])
@pytest.mark.parametrize("seq_len", [1, 1500])
@pytest.mark.parametrize(
    ("k", "std"), [(1, False), (1, True), (5, False), (5, True), (64, False), (64, True)]
)
def test_fused_pooling_matches_reference(kernel_device, padding, rows, seq_len, k, std):
    # H = 80 is not a multiple of the 64-column interpreter tile; B = 37 not one of the 16-row tile.
    inputs = make_fused_inputs(rows, seq_len, 80, k, seed=44 + k, padding=padding, std=std)
    out, ref = run_both(inputs, kernel_device)
    assert_matches(out, ref)
    assert out.heads.shape == (rows, k)


@pytest.mark.parametrize("layout", ["transposed", "columns", "sliced"])
def test_fused_pooling_reads_strided_hidden_states(kernel_device, layout):
    inputs = make_fused_inputs(19, 33, 80, 5, seed=45, std=True, layout=layout)
    assert not inputs["pooled"].is_contiguous()
    out, ref = run_both(inputs, kernel_device)
    assert_matches(out, ref)
    assert_matches(out, heads_aggregate_reference(**gathered(inputs)))


def test_fused_pooling_int32_positions(kernel_device):
    inputs = make_fused_inputs(21, 7, 48, 5, seed=46, std=True)
    inputs["positions"] = inputs["positions"].int()
    assert_matches(*run_both(inputs, kernel_device))


def test_kernel_positions_outside_the_sequence_give_nan_rows(kernel_device):
    # The caller's contract, unchecked on the host: the kernel never reads outside the hidden states and
    # flags those inputs with NaN everywhere; the other rows are unaffected.
    inputs = make_fused_inputs(5, 6, 40, 4, seed=47, std=True)
    inputs["positions"] = torch.tensor([5, -1, 6, 0, 10**12])
    inputs = {name: v.to(kernel_device) if isinstance(v, torch.Tensor) else v for name, v in inputs.items()}
    out = heads_aggregate_triton(**inputs)
    bad = torch.tensor([False, True, True, False, True], device=kernel_device)
    for table in (out.heads, out.head_std, out.aggregates):
        assert table[bad].isnan().all() and not table[~bad].isnan().any()
    good = {**inputs, "pooled": inputs["pooled"][~bad], "positions": inputs["positions"][~bad]}
    good |= {"uwo_lambda": inputs["uwo_lambda"][~bad], "tradeoff_lambda": inputs["tradeoff_lambda"][~bad]}
    ref = heads_aggregate_reference(**good)
    assert_matches(HeadOutputs(out.heads[~bad], out.head_std[~bad], out.aggregates[~bad]), ref)


# --- launch configurations (autotune on CUDA, one tile in the interpreter) -----------------------------


def test_size_bucket():
    assert [size_bucket(n, low=16, high=256) for n in (0, 1, 16, 17, 32, 33, 200, 256, 257, 10**6)] == [
        16,
        16,
        16,
        32,
        32,
        64,
        256,
        256,
        256,
        256,
    ]
    with pytest.raises(ValueError, match="powers of two with low <= high"):
        size_bucket(5, low=24, high=256)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Tile({"BLOCK_B": 24}), r"BLOCK_B=24 is not a power of two"),
        (lambda: Tile({"BLOCK_B": 16}, num_warps=3), "num_warps=3 must be a power of two"),
        (lambda: Tile({"BLOCK_B": 16}, num_stages=0), "num_stages=0 must be an integer >= 1"),
        (
            lambda: TuningSpace((Tile({"BLOCK_B": 8}),), Tile({"BLOCK_B": 16}), ("BLOCK_B",)),
            f"BLOCK_B=8 is a side of a tl.dot operand, which needs >= {MIN_DOT_SIDE}",
        ),
        (
            lambda: TuningSpace((Tile({"BLOCK_B": 16}),), Tile({"BLOCK_H": 16}), ()),
            "every tile must tune the same meta-parameters",
        ),
        (lambda: TuningSpace((), Tile({"BLOCK_B": 16}), ()), "at least one candidate"),
        (
            lambda: TuningSpace((Tile({"BLOCK_B": 16}), Tile({"BLOCK_B": 16})), Tile({"BLOCK_B": 16}), ()),
            "repeat one another",
        ),
    ],
)
def test_tuning_spaces_refuse_invalid_tiles(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@needs_triton
def test_heads_autotune_configs_are_valid_for_every_launch():
    space = rmserve_kernels.heads._TUNING
    configs = tuning_configs(space, interpreted=False)
    assert len(configs) == len(space.candidates) >= 4
    for config in configs:
        assert set(config.kwargs) == {"BLOCK_B", "BLOCK_H"}
        assert all(size >= MIN_DOT_SIDE and size & (size - 1) == 0 for size in config.kwargs.values())
        assert config.num_warps in (4, 8) and 2 <= config.num_stages <= 4
    [interpreter] = tuning_configs(space, interpreted=True)
    assert min(interpreter.kwargs.values()) >= MIN_DOT_SIDE
    # Launch-time pruning always leaves the first tile, for any head count, hidden size and batch.
    for k in (1, 5, 16, 17, 64, 100, MAX_HEADS):
        block_k = max(16, 1 << (k - 1).bit_length())
        for hidden in (1, 16, 80, 576, 4096):
            for bucket in (16, 32, 256):
                launch = {"H": hidden, "K": k, "BLOCK_K": block_k, "B_BUCKET": bucket}
                fitting = [t for t in space.candidates if space.fits({**launch, **t.blocks})]
                assert fitting and fitting[0] == space.candidates[0], launch
    # Wide tiles are pruned for 128 heads; everything fits a single head on a long hidden state.
    wide = {"H": 4096, "K": MAX_HEADS, "BLOCK_K": MAX_HEADS, "B_BUCKET": 256}
    assert [t.blocks["BLOCK_H"] for t in space.candidates if space.fits({**wide, **t.blocks})] == [32]
    narrow = {"H": 4096, "K": 1, "BLOCK_K": 16, "B_BUCKET": 256}
    assert all(space.fits({**narrow, **t.blocks}) for t in space.candidates)


@needs_triton
def test_the_kernel_is_autotuned_only_when_compiled():
    heads = rmserve_kernels.heads
    assert_autotuned_only_when_compiled(heads._heads_aggregate_tuned, heads._TUNING)


@pytest.mark.parametrize("index", range(len(rmserve_kernels.heads._TUNING.candidates)))
def test_every_autotune_candidate_matches_reference(kernel_device, monkeypatch: pytest.MonkeyPatch, index):
    # Each CUDA candidate's tile, alone (a single config is launched without timing), in this process's
    # mode: the interpreter checks the results of tiles it would never pick itself.
    launch_candidate_alone(monkeypatch, rmserve_kernels.heads, "_heads_aggregate_tuned", index)
    assert_matches(*run_both(make_fused_inputs(37, 5, 200, 5, seed=48, std=True), kernel_device))
    assert_matches(*run_both(make_inputs(70, 96, 20, seed=49, std=True, nominal_head=None), kernel_device))


def test_the_reference_stays_float32_inside_a_bfloat16_autocast_forward():
    g = torch.Generator().manual_seed(0)
    pooled, weight, std_weight = (torch.randn(4, 64, generator=g) for _ in range(3))
    weight, std_weight = weight[:3], std_weight[:3]
    kwargs = dict(
        nominal_head=None, uwo_lambda=torch.full((4,), 0.5), tradeoff_lambda=torch.full((4,), 0.3), eps=1e-3
    )
    plain = rmserve_kernels.heads.heads_aggregate_reference(pooled, weight, None, std_weight, None, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = rmserve_kernels.heads.heads_aggregate_reference(
            pooled, weight, None, std_weight, None, **kwargs
        )
    assert inside.heads.dtype == torch.float32
    torch.testing.assert_close(inside.heads, plain.heads, rtol=0, atol=0)
    torch.testing.assert_close(inside.head_std, plain.head_std, rtol=0, atol=0)
