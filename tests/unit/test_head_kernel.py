"""The fused heads-and-aggregates Triton kernel against its torch reference, and the reference by hand.

Kernel tests take the ``kernel_device`` fixture: the GPU when there is one, else the CPU in Triton's
interpreter, in float32 only (the interpreter computes bfloat16 ``tl.dot`` wrongly).

Why the interpreter runs in a child process. Triton decides interpreted-or-compiled once per process, when
it is first imported: its own ``tl.zeros``, ``tl.sum``... are ``triton.jit`` functions made then, so
setting ``TRITON_INTERPRET`` later (monkeypatch in a test, or even at the top of this module) does not work
in triton 3.7.1. And tests/conftest.py imports transformers, which imports torch._dynamo, which imports
triton, before any test module is collected. So without a GPU, and unless ``TRITON_INTERPRET=1`` was
exported before pytest started (then everything runs in this process), the kernel tests skip here and
``test_kernel_tests_in_the_triton_interpreter`` reruns this module in a child pytest with
``TRITON_INTERPRET=1`` exported; nothing leaks into other test modules.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import rmserve.kernels
from rmserve.aggregation import AGGREGATES
from rmserve.kernels.heads import (
    MAX_HEADS,
    HeadOutputs,
    heads_aggregate_reference,
    heads_aggregate_triton,
    select_heads_aggregate,
)

COLUMN = {name: i for i, name in enumerate(AGGREGATES)}
REPO = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Whether this process's triton interprets: TRITON_INTERPRET=1 was exported before pytest started.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the kernel runs: the GPU, else the CPU if this process's triton interprets."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not INTERPRETING:
        pytest.skip("no GPU: run under TRITON_INTERPRET=1 by test_kernel_tests_in_the_triton_interpreter")
    return torch.device("cpu")


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
    monkeypatch.delitem(sys.modules, "rmserve.kernels.heads")
    monkeypatch.setattr(rmserve.kernels, "heads", rmserve.kernels.heads)
    fresh = importlib.import_module("rmserve.kernels.heads")
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


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETING, reason="the kernel tests run in this process")
def test_kernel_tests_in_the_triton_interpreter():
    """Rerun this module in a child pytest whose triton interprets (see the module docstring)."""
    # --noconftest: this module needs no shared fixture, and tests/conftest.py imports transformers (slow).
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", __file__]
    child = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = child.stdout[-8000:] + child.stderr[-2000:]
    assert child.returncode == 0, report
    # Everything ran but this test: a kernel test that skipped in the child would hide a broken setup.
    assert re.search(r"\b\d+ passed, 1 skipped\b", child.stdout), report


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
