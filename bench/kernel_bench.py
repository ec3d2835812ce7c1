"""The Triton kernels against their torch references on a CUDA GPU: time, speedup, GB/s, TFLOP/s per case.

Cases (the functions the models call, with their own signatures):

- heads + aggregates (``rmserve_kernels.heads``) from pooled states (B, H) and, with ``positions=``,
  straight from (B, T, H) final hidden states (T = 256, right-padded lengths): B in {1, 64, 512},
  H in {896, 2048, 4096}, k in {1, 5, 64} heads, plain (multi-head) and BRME; states in bfloat16, heads
  in float32 as the models keep them;
- MoE routing and grouped SwiGLU experts (``rmserve_kernels.routing``, ``.experts``): 4096 and 16384 tokens, H 2048,
  intermediate 5632, N = 4 and 8 experts at K = 2 as rmserve's ``moe`` models count them (a shared expert
  plus N - 1 routed ones; the shared one and the top-1 routed expert active per token), bfloat16;
- RMSNorm (``rmserve_kernels.rmsnorm``, the Llama form): 4096 and 16384 tokens, H 2048 and 4096,
  bfloat16 and float32;
- the dense forward of a SmolLM2-135M-shaped model (random weights, bfloat16) with transformers' eager
  RMSNorm and with the fused one (``fuse_rmsnorm``), what the norm kernel buys a whole forward.

Each time is the median of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). GB/s is the
bytes a case must move at least (each input read once, each output written once) over the time; TFLOP/s is
given for the matrix products. The references are the definitions: heads, routing and experts compute in
float32 whatever the input dtype (part of their speedup is that), RMSNorm's is transformers' own eager code
in the input dtype. Every case is checked against its reference (max abs error, relative to the largest
reference value, and whether that is within the dtype's tolerance).

    python bench/kernel_bench.py                              # CUDA: prints and writes docs/benchmarks-gpu.md
    python bench/kernel_bench.py --smoke                      # any machine: every case once, tiny, checked
    python bench/kernel_bench.py --rmsnorm-share              # CPU: RMSNorm's share of a dense forward

``--smoke`` runs every case once at tiny shapes in Triton's CPU interpreter, in float32 (it re-runs itself
with ``TRITON_INTERPRET=1`` if that is not set), checks each against its reference and prints the table
without writing anything: it proves the script runs. ``--rmsnorm-share`` profiles the forward of the same
SmolLM2-135M-shaped model on the CPU with ``torch.profiler`` and writes its own section.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from report import gpu_machine, machine, write_section  # bench/report.py: run as python bench/kernel_bench.py

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks-gpu.md"
SMOLLM2_135M = {  # the demo backbone's shape, used when it is not cached
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}
NO_CUDA = (
    "bench/kernel_bench.py times the Triton kernels on a CUDA GPU, and torch sees none here "
    "(torch.cuda.is_available() is False). Run it on a machine with an NVIDIA GPU and a CUDA build of torch: "
    "bash bench/gpu.sh (everything) or python bench/kernel_bench.py. On this machine, "
    "python bench/kernel_bench.py --smoke checks that the script runs (Triton's CPU interpreter, tiny shapes)."
)


# --- cases ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """One case's inputs bound into two calls, and what the case must move and compute."""

    kernel: Callable[[], Any]
    reference: Callable[[], Any]
    bytes_moved: int
    flops: int | None
    error: Callable[[Any, Any], float]  # max abs difference of the outputs over the largest reference value


@dataclass(frozen=True)
class Case:
    family: str
    shape: str
    dtype: torch.dtype
    prepare: Callable[[], Prepared]


@dataclass(frozen=True)
class Grid:
    """The shapes of every case: realistic on CUDA, tiny for ``--smoke``."""

    batches: tuple[int, ...]
    hiddens: tuple[int, ...]
    heads: tuple[int, ...]
    seq_len: int
    tokens: tuple[int, ...]
    moe_hidden: int
    ffn: int
    experts: tuple[int, ...]
    norm_tokens: tuple[int, ...]
    norm_hiddens: tuple[int, ...]
    dtype: torch.dtype  # of the states, tokens and MoE weights
    norm_dtypes: tuple[torch.dtype, ...]


FULL = Grid(
    batches=(1, 64, 512),
    hiddens=(896, 2048, 4096),
    heads=(1, 5, 64),
    seq_len=256,
    tokens=(4096, 16384),
    moe_hidden=2048,
    ffn=5632,
    experts=(4, 8),
    norm_tokens=(4096, 16384),
    norm_hiddens=(2048, 4096),
    dtype=torch.bfloat16,
    norm_dtypes=(torch.bfloat16, torch.float32),
)
SMOKE = Grid(
    batches=(1, 3, 17),
    hiddens=(24, 40, 96),
    heads=(1, 5, 64),
    seq_len=5,
    tokens=(24, 40),
    moe_hidden=32,
    ffn=48,
    experts=(4, 8),
    norm_tokens=(7, 24),
    norm_hiddens=(40, 100),
    dtype=torch.float32,
    norm_dtypes=(torch.float32,),
)
TOP_K = 2  # K: the shared expert + K - 1 routed experts per token


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(1, max |want|), NaNs in the same places counted as equal."""
    got, want = got.float(), want.float()
    same_nan = got.isnan() & want.isnan()
    diff = torch.where(same_nan, 0.0, (got - want).abs())
    if bool(diff.isnan().any()):
        return math.inf
    scale = max(1.0, float(torch.nan_to_num(want, nan=0.0).abs().max())) if want.numel() else 1.0
    return float(diff.max()) / scale if diff.numel() else 0.0


SKIPPED: list[str] = []  # why a family of cases did not run, printed and reported


def heads_cases(grid: Grid, device: torch.device) -> list[Case]:
    from rmserve_kernels import heads
    from rmserve_kernels.heads import heads_aggregate_reference, heads_aggregate_triton

    with_positions = hasattr(heads, "scored_positions") and all(
        "positions" in inspect.signature(f).parameters
        for f in (heads_aggregate_reference, heads_aggregate_triton)
    )
    if not with_positions:
        SKIPPED.append(
            "heads, positions: skipped, rmserve_kernels.heads has no positions= keyword (nor scored_positions)"
        )

    def prepare(batch: int, hidden: int, k: int, brme: bool, positions: bool) -> Prepared:
        g = torch.Generator(device=device).manual_seed(batch * 7919 + hidden * 31 + k)

        def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.randn(*shape, generator=g, device=device, dtype=dtype)

        if positions:
            states = randn(batch, grid.seq_len, hidden, dtype=grid.dtype)  # (B, T, H)
            lengths = torch.randint(1, grid.seq_len + 1, (batch,), generator=g, device=device)  # (B,)
            extra: dict[str, Any] = {"positions": heads.scored_positions(lengths, grid.seq_len, "right")}
        else:
            states = randn(batch, hidden, dtype=grid.dtype)  # (B, H)
            extra = {}
        scale = 1 / math.sqrt(hidden)
        kwargs = {
            "pooled": states,
            "weight": randn(k, hidden) * scale,
            "bias": randn(k),
            "std_weight": randn(k, hidden) * scale if brme else None,
            "std_bias": randn(k) if brme else None,
            "nominal_head": None if brme else 0,
            "uwo_lambda": torch.ones(batch, device=device),
            "tradeoff_lambda": torch.full((batch,), 0.6, device=device),
            "eps": 1e-6,
            **extra,
        }
        projections = 2 if brme else 1
        moved = (
            batch * hidden * _size(grid.dtype)  # the scored rows only, also with positions
            + projections * (k * hidden + k) * 4  # head weights and biases, float32
            + 2 * batch * 4  # lambdas
            + (projections * k + 7) * batch * 4  # rewards, sigmas, aggregates
            + (batch * 8 if positions else 0)
        )

        def error(got: Any, want: Any) -> float:
            return max(_relative(got.heads, want.heads), _relative(got.aggregates, want.aggregates))

        return Prepared(
            lambda: heads_aggregate_triton(**kwargs),
            lambda: heads_aggregate_reference(**kwargs),
            moved,
            2 * batch * hidden * k * projections,
            error,
        )

    cases = []
    for positions in (False, True) if with_positions else (False,):
        family = "heads, positions" if positions else "heads, pooled"
        for brme in (False, True):
            for batch in grid.batches:
                for hidden in grid.hiddens:
                    for k in grid.heads:
                        shape = f"{'BRME' if brme else 'plain'} B={batch} H={hidden} k={k}"
                        if positions:
                            shape += f" T={grid.seq_len}"
                        cases.append(
                            Case(
                                family,
                                shape,
                                grid.dtype,
                                lambda b=batch, h=hidden, k=k, s=brme, p=positions: prepare(b, h, k, s, p),
                            )
                        )
    return cases


def moe_cases(grid: Grid, device: torch.device) -> list[Case]:
    from rmserve_kernels.experts import grouped_swiglu_reference, grouped_swiglu_triton
    from rmserve_kernels.routing import route_reference, route_triton

    hidden, ffn, dtype, routed = grid.moe_hidden, grid.ffn, grid.dtype, TOP_K - 1
    size = _size(dtype)

    def inputs(tokens: int, experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        g = torch.Generator(device=device).manual_seed(tokens + experts)
        x = torch.randn(tokens, hidden, generator=g, device=device, dtype=dtype)  # (T, H)
        router = torch.randn(experts - 1, hidden, generator=g, device=device, dtype=dtype) / math.sqrt(hidden)
        return x, router, g

    def prepare_route(tokens: int, experts: int) -> Prepared:
        x, router, _ = inputs(tokens, experts)

        def error(got: Any, want: Any) -> float:
            same = got.expert_index == want.expert_index  # near-ties may pick either expert
            return max(
                _relative(got.shared_weight, want.shared_weight),
                _relative(got.expert_weight[same], want.expert_weight[same]),
            )

        moved = (tokens + experts - 1) * hidden * size + tokens * (routed * (8 + 4) + 4)
        return Prepared(
            lambda: route_triton(x, router, routed),
            lambda: route_reference(x, router, routed),
            moved,
            2 * tokens * hidden * (experts - 1),
            error,
        )

    def prepare_swiglu(tokens: int, experts: int) -> Prepared:
        x, router, g = inputs(tokens, experts)
        n = experts - 1

        def weights(*shape: int, fan_in: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, device=device, dtype=dtype) / math.sqrt(fan_in)

        gate, up = weights(n, ffn, hidden, fan_in=hidden), weights(n, ffn, hidden, fan_in=hidden)  # (E, F, H)
        down = weights(n, hidden, ffn, fan_in=ffn)  # (E, H, F)
        routing = route_reference(x, router, routed)
        moved = 2 * tokens * hidden * size + 3 * n * ffn * hidden * size + tokens * routed * (8 + 4)
        return Prepared(
            lambda: grouped_swiglu_triton(x, gate, up, down, routing),
            lambda: grouped_swiglu_reference(x, gate, up, down, routing),
            moved,
            6 * tokens * routed * hidden * ffn,
            _relative,
        )

    cases = []
    for tokens in grid.tokens:
        for experts in grid.experts:
            shape = f"T={tokens} H={hidden} N={experts} K={TOP_K}"
            cases.append(Case("MoE routing", shape, dtype, lambda t=tokens, e=experts: prepare_route(t, e)))
    for tokens in grid.tokens:
        for experts in grid.experts:
            shape = f"T={tokens} H={hidden} F={ffn} N={experts} K={TOP_K}"
            cases.append(
                Case("MoE grouped SwiGLU", shape, dtype, lambda t=tokens, e=experts: prepare_swiglu(t, e))
            )
    return cases


def rmsnorm_cases(grid: Grid, device: torch.device) -> list[Case]:
    from rmserve_kernels.rmsnorm import rmsnorm_reference, rmsnorm_triton

    def prepare(tokens: int, hidden: int, dtype: torch.dtype) -> Prepared:
        g = torch.Generator(device=device).manual_seed(tokens + hidden)
        x = torch.randn(tokens, hidden, generator=g, device=device, dtype=dtype)  # (T, H)
        weight = (1 + 0.1 * torch.randn(hidden, generator=g, device=device)).to(dtype)  # (H,)
        return Prepared(
            lambda: rmsnorm_triton(x, weight, 1e-5),
            lambda: rmsnorm_reference(x, weight, 1e-5),
            (2 * tokens + 1) * hidden * _size(dtype),
            None,
            _relative,
        )

    return [
        Case("RMSNorm", f"T={tokens} H={hidden}", dtype, lambda t=tokens, h=hidden, d=dtype: prepare(t, h, d))
        for dtype in grid.norm_dtypes
        for tokens in grid.norm_tokens
        for hidden in grid.norm_hiddens
    ]


def tolerance(dtype: torch.dtype) -> float:
    """The largest relative error a case may show: float32 summation order, or one bfloat16 rounding."""
    return 1e-4 if dtype == torch.float32 else 2e-2


# --- running --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    case: Case
    kernel_ms: float
    reference_ms: float
    bytes_moved: int
    flops: int | None
    error: float

    @property
    def within(self) -> bool:
        return self.error <= tolerance(self.case.dtype)


def run_case(case: Case, *, smoke: bool) -> Result:
    """Run a case's kernel and reference, compare them, and time each (once for ``smoke``, else do_bench)."""
    prepared = case.prepare()
    start = time.perf_counter()
    got = prepared.kernel()
    kernel_s = time.perf_counter() - start
    start = time.perf_counter()
    want = prepared.reference()
    reference_s = time.perf_counter() - start
    error = prepared.error(got, want)
    if smoke:
        kernel_ms, reference_ms = kernel_s * 1e3, reference_s * 1e3
    else:
        from triton.testing import do_bench

        kernel_ms = do_bench(prepared.kernel, return_mode="median")
        reference_ms = do_bench(prepared.reference, return_mode="median")
    return Result(case, kernel_ms, reference_ms, prepared.bytes_moved, prepared.flops, error)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")


def table(results: list[Result]) -> list[str]:
    lines = [
        "| kernel | case | dtype | Triton µs | torch µs | speedup | Triton GB/s | torch GB/s | Triton TFLOP/s "
        "| max rel. error |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        tflops = f"{r.flops / r.kernel_ms / 1e9:.2f}" if r.flops else "-"
        check = "" if r.within else f" (over {tolerance(r.case.dtype):.0e})"
        lines.append(
            f"| {r.case.family} | {r.case.shape} | {_dtype(r.case.dtype)} | {r.kernel_ms * 1e3:.1f} | "
            f"{r.reference_ms * 1e3:.1f} | {r.reference_ms / r.kernel_ms:.2f}x | "
            f"{r.bytes_moved / r.kernel_ms / 1e6:.0f} | {r.bytes_moved / r.reference_ms / 1e6:.0f} | {tflops} | "
            f"{r.error:.1e}{check} |"
        )
    return lines


# --- the dense forward, eager vs fused RMSNorm ------------------------------------------------------------


def demo_shaped_model(dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, str]:
    """A random LlamaForSequenceClassification of the demo backbone's shape, and where the shape came from."""
    from transformers import AutoConfig, LlamaConfig, LlamaForSequenceClassification

    from rmserve.config import Settings
    from rmserve.demo.build import BACKBONE_DIR

    backbone = Settings().cache_dir / BACKBONE_DIR
    if (backbone / "config.json").is_file():
        config = AutoConfig.from_pretrained(backbone)
        source = f"the config of the cached demo backbone (`{BACKBONE_DIR}`)"
    else:
        config, source = LlamaConfig(**SMOLLM2_135M), "SmolLM2-135M's config values (no cached demo backbone)"
    config.num_labels = 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).to(device=device, dtype=dtype).eval()
    return model, source


def forward_case(batch: int, seq_len: int) -> list[str]:
    """The demo-shaped dense forward on CUDA in bfloat16: eager RMSNorm vs fused, median ms each."""
    from triton.testing import do_bench

    from rmserve_kernels.rmsnorm import fuse_rmsnorm

    device = torch.device("cuda")
    model, source = demo_shaped_model(torch.bfloat16, device)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)  # (B, T)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model.model(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, H)

    eager_out = forward()
    eager = do_bench(forward, return_mode="median")
    fused_norms = fuse_rmsnorm(model, "triton")
    fused_out = forward()
    fused = do_bench(forward, return_mode="median")
    error = _relative(fused_out, eager_out)
    return [
        f"Dense forward of a SmolLM2-135M-shaped model ({source}; random weights, bfloat16), "
        f"{batch} x {seq_len} tokens, base model only: transformers' eager RMSNorm {eager:.2f} ms, with its "
        f"{fused_norms} RMSNorm modules fused {fused:.2f} ms ({eager / fused:.3f}x, {1 - fused / eager:.1%} of "
        f"the forward saved). Max relative difference of the final hidden "
        f"states: {error:.1e} (bfloat16 rounding through {model.config.num_hidden_layers} layers).",
    ]


# --- RMSNorm's share of a forward, profiled on the CPU ----------------------------------------------------


def rmsnorm_share(batch: int, seq_len: int, repeats: int) -> str:
    """Profile the demo-shaped dense forward on the CPU (float32) and report RMSNorm's share of its time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from rmserve_kernels.rmsnorm import rmsnorm_style

    model, source = demo_shaped_model(torch.float32, torch.device("cpu"))
    norms = [m for m in model.modules() if rmsnorm_style(m) is not None]
    open_ranges: dict[int, Any] = {}

    def enter(module: torch.nn.Module, args: Any) -> None:
        open_ranges[id(module)] = record_function("rmsnorm").__enter__()

    def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
        open_ranges.pop(id(module)).__exit__(None, None, None)

    for norm in norms:
        norm.register_forward_pre_hook(enter)
        norm.register_forward_hook(leave)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))  # (B, T)
    with torch.inference_mode():
        model.model(input_ids=ids, use_cache=False)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                with record_function("forward"):
                    model.model(input_ids=ids, use_cache=False)
    totals = {e.key: e for e in prof.key_averages()}
    forward_us = totals["forward"].cpu_time_total
    norm_us = totals["rmsnorm"].cpu_time_total
    calls = totals["rmsnorm"].count
    ops = next(e for e in prof.events() if e.name == "rmsnorm").cpu_children
    op_names = ", ".join(e.name.removeprefix("aten::") for e in ops)
    lines = [
        "## RMSNorm's share of a dense forward, on the CPU (`bench/kernel_bench.py --rmsnorm-share`)",
        "",
        f"Machine: {machine()}. Measured on the CPU in float32, whatever GPU the machine has.",
        "",
        "```",
        f"python bench/kernel_bench.py --rmsnorm-share --batch {batch} --seq-len {seq_len} --repeats {repeats} "
        f"--threads {torch.get_num_threads()}",
        "```",
        "",
        f"`torch.profiler` over {repeats} forwards (after a warm-up) of the base model of a random "
        f"`LlamaForSequenceClassification` built from {source}: {model.config.num_hidden_layers} layers, "
        f"hidden {model.config.hidden_size}, float32, {batch} x {seq_len} tokens. Each of the {len(norms)} "
        "RMSNorm calls per forward is wrapped in a profiler range."
        + (
            " One torch thread: with more on a machine shared with other jobs, each small parallel op of a "
            "norm waits for descheduled threads, which inflates the norms' share."
            if torch.get_num_threads() == 1
            else ""
        ),
        "",
        "| | CPU time | share |",
        "| --- | ---: | ---: |",
        f"| whole forward ({repeats} runs) | {forward_us / 1e3:.0f} ms | 100% |",
        f"| RMSNorm ({calls} calls) | {norm_us / 1e3:.0f} ms | {norm_us / forward_us:.1%} |",
        "",
        f"transformers' eager RMSNorm is {len(ops)} torch ops per call here ({op_names}; in float32 the two "
        "`to` are no-ops, in bfloat16 they are copies). On a CPU each op is a pass over the activations in cache-friendly chunks and the "
        "matrix products dominate. On a GPU each op is a kernel launch and a round trip of the (tokens, "
        "hidden) activations through HBM, and RMSNorm does almost no arithmetic per byte (memory-bound), "
        "so the eager form costs several times what one fused read and write does, and its share of a "
        "small model's forward grows. The CUDA section (`bench/kernel_bench.py` on a GPU: the kernel against "
        "the eager code, and a whole forward with and without it) measures that.",
    ]
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------------------


def all_cases(grid: Grid, device: torch.device) -> list[Case]:
    return [*heads_cases(grid, device), *moe_cases(grid, device), *rmsnorm_cases(grid, device)]


def smoke() -> int:
    """Every case once, tiny, float32, in Triton's interpreter on the CPU; 1 if any disagrees."""
    results = [run_case(case, smoke=True) for case in all_cases(SMOKE, torch.device("cpu"))]
    for reason in SKIPPED:
        print(reason)
    print(
        "One call of each, Triton's CPU interpreter against torch on the CPU: the times say nothing of a GPU."
    )
    print("\n".join(table(results)))
    bad = [r for r in results if not r.within]
    for r in bad:
        print(f"MISMATCH {r.case.family} {r.case.shape}: {r.error:.2e}", file=sys.stderr)
    print(f"{len(results)} cases, {len(bad)} outside tolerance (TRITON_INTERPRET=1, CPU, float32).")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="every case once, tiny, CPU interpreter")
    parser.add_argument("--rmsnorm-share", action="store_true", help="CPU profile of RMSNorm in a forward")
    parser.add_argument("--batch", type=int, default=4, help="--rmsnorm-share: sequences per forward")
    parser.add_argument("--seq-len", type=int, default=256, help="--rmsnorm-share: tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="--rmsnorm-share: profiled forwards")
    parser.add_argument("--threads", type=int, default=None, help="--rmsnorm-share: torch CPU threads")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    if args.rmsnorm_share:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        report = rmsnorm_share(args.batch, args.seq_len, args.repeats)
        write_section(args.out, "bench/kernel_bench.py --rmsnorm-share", report)
        print(report)
        return 0
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":  # triton fixes its mode at import: re-run
            print("--smoke: re-running under TRITON_INTERPRET=1 (Triton's CPU interpreter)", file=sys.stderr)
            env = {**os.environ, "TRITON_INTERPRET": "1"}
            os.execve(sys.executable, [sys.executable, *sys.argv], env)
        return smoke()
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "TRITON_INTERPRET=1 would time Triton's CPU interpreter; unset it to time the GPU.",
            file=sys.stderr,
        )
        return 2

    device = torch.device("cuda")
    results = []
    for case in all_cases(FULL, device):
        print(f"{case.family} {case.shape} {_dtype(case.dtype)} ...", file=sys.stderr, flush=True)
        results.append(run_case(case, smoke=False))
        torch.cuda.empty_cache()
    forward = forward_case(16, 512)
    lines = [
        "## Triton kernels vs torch references (`bench/kernel_bench.py`)",
        "",
        f"GPU: {gpu_machine()}.",
        "",
        "```",
        "python bench/kernel_bench.py",
        "```",
        "",
        "Median of `triton.testing.do_bench` per call. GB/s: the least bytes a case moves (inputs read "
        "once, outputs written once) over its time; TFLOP/s for the matrix products. Heads, routing and "
        "experts references compute in float32 (they are the definitions); RMSNorm's is transformers' "
        "eager code in the input dtype. Max rel. error: the largest difference from the reference over its "
        f"largest value (tolerance {tolerance(torch.float32):.0e} in float32, {tolerance(torch.bfloat16):.0e} "
        "in bfloat16).",
        "",
        *table(results),
        "",
        *(line for reason in SKIPPED for line in (f"{reason}.", "")),
        *forward,
    ]
    report = "\n".join(lines) + "\n"
    write_section(args.out, "bench/kernel_bench.py", report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
