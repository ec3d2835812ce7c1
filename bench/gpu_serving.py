"""Serving the demo models on a CUDA GPU in bfloat16: tokens/s, requests/s, latency and GPU memory.

For each of ``demo`` (dense), ``demo-merged``, ``demo-moe``, ``demo-ensemble`` (multi-head) and ``demo-brme``:
start ``rmserve serve --model NAME --dtype bfloat16 --device cuda`` (default settings, ``--kernels auto``:
the Triton kernels), then send ``--requests`` HH-RLHF dialogues (chat-templated, one per request) from
``--concurrency`` clients, each sending its next request when the last is answered (as ``bench/serving.py``
does, OpenRLHF's remote reward pattern): a warm-up pass (the Triton kernels compile, and autotune on the
first batch of each shape bucket), then ``--repeats`` timed runs. Reported per model:

- tokens/s and requests/s: the median run's;
- p50 / p95 latency: over every request of the timed runs, from send to parsed answer, on the client;
- padding efficiency: real over padded tokens in the server's batches (its /metrics);
- GPU memory: the server's model weights (its /metrics), and the peak of the device's memory in use
  during the runs (``nvidia-smi``, sampled every 0.2 s) above what was in use before the server started,
  i.e. weights, activations, the CUDA context and torch's cache.

``--quantized`` models (default ``demo``) are served once more with ``--quantize int8`` and once with
``--quantize nf4``, for the quantised modes' throughput and memory on the GPU (their agreement with the
unquantised model: ``bench/quantize.py --device cuda --dtype bfloat16``).

    python bench/gpu_serving.py --out docs/benchmarks-gpu.md      (bench/gpu.sh runs it)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from report import gpu_machine, write_section  # bench/report.py: run as python bench/gpu_serving.py
from serving import counter  # bench/serving.py

from rmserve.config import ModelSpec, Settings
from rmserve.launch import start_server
from rmserve.scoring.loading import resolve_model_path
from rmserve.training.hh import default_data_path, load_pairs

ROOT = Path(__file__).resolve().parents[1]
NO_CACHE = ("--duplicate-cache-entries", "0")
MODELS = ("demo", "demo-merged", "demo-moe", "demo-ensemble", "demo-brme")
QUANTIZED_MODES = ("int8", "nf4")


@dataclass(frozen=True)
class Timed:
    """One timed run: wall seconds, tokens scored, and each request's latency in seconds."""

    seconds: float
    tokens: int
    latencies: list[float]


async def drive_timed(url: str, payloads: list[dict], concurrency: int) -> Timed:
    """``bench/serving.py``'s ``drive`` (one input per request from ``concurrency`` clients), timing each request."""
    queue = iter(payloads)
    tokens = 0
    latencies: list[float] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for payload in queue:
            sent = time.perf_counter()
            r = await client.post("/v1/score", json=payload)
            r.raise_for_status()
            tokens += r.json()["usage"]["input_tokens"]
            latencies.append(time.perf_counter() - sent)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return Timed(time.perf_counter() - start, tokens, latencies)


def gpu_index() -> str:
    """The GPU ``cuda`` means, as nvidia-smi names it (the first of CUDA_VISIBLE_DEVICES, else 0)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def memory_used_mib(index: str) -> float:
    """Memory in use on GPU ``index`` now, MiB (nvidia-smi: every process on the device)."""
    out = subprocess.run(
        ["nvidia-smi", f"--id={index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[0])


class PeakMemory:
    """Samples the GPU's memory in use every ``interval`` seconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, index: str, interval: float = 0.2) -> None:
        self.index, self.interval, self.peak = index, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, memory_used_mib(self.index))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, memory_used_mib(self.index))


@dataclass(frozen=True)
class ModelResult:
    name: str
    quantize: str
    kind: str
    runs: list[Timed]
    padding_efficiency: float
    weights_bytes: float
    peak_mib: float
    fused_norms: str

    def median_run(self, field: str) -> float:
        values = [
            r.tokens / r.seconds if field == "tokens" else len(r.latencies) / r.seconds for r in self.runs
        ]
        return statistics.median(values)

    def latency_ms(self, q: float) -> float:
        latencies = sorted(itertools.chain.from_iterable(r.latencies for r in self.runs))
        return statistics.quantiles(latencies, n=100, method="inclusive")[round(q * 100) - 1] * 1e3


def fused_norms(log_text: str) -> str:
    """How many RMSNorm modules the server fused, from its load log (``rmserve_kernels.rmsnorm``)."""
    counts = [
        line.split("fused ", 1)[1].split(" RMSNorm", 1)[0]
        for line in log_text.splitlines()
        if "fused " in line and " RMSNorm modules" in line
    ]
    return " + ".join(counts) if counts else "-"


def measure(
    name: str, quantize: str, payloads: list[dict], args: argparse.Namespace, log: Path
) -> ModelResult:
    index = gpu_index()
    baseline = memory_used_mib(index)
    server = start_server(
        # every run repeats the inputs: the duplicate cache is off, so the forwards are measured
        ["--model", name, "--dtype", "bfloat16", "--device", "cuda", "--quantize", quantize, *NO_CACHE],
        log,
        ready_timeout=args.ready_timeout,
    )
    try:
        kind = httpx.get(f"{server.url}/v1/models").json()["data"][0].get("kind", "?")
        # warm-up: a whole pass, so the kernels are compiled and autotuned for every batch shape this load makes
        asyncio.run(drive_timed(server.url, payloads, args.concurrency))
        before = httpx.get(f"{server.url}/metrics").text
        with PeakMemory(index) as memory:
            runs = [
                asyncio.run(drive_timed(server.url, payloads, args.concurrency)) for _ in range(args.repeats)
            ]
        after = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    real = counter(after, "rmserve_real_tokens_total") - counter(before, "rmserve_real_tokens_total")
    padded = counter(after, "rmserve_padded_tokens_total") - counter(before, "rmserve_padded_tokens_total")
    return ModelResult(
        name,
        quantize,
        kind,
        runs,
        real / padded,
        counter(after, "rmserve_model_weights_bytes"),
        memory.peak - baseline,
        fused_norms(server.log_text()),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=512, help="dialogues per timed run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--quantized",
        nargs="*",
        default=["demo"],
        choices=MODELS,
        help="models also served with --quantize int8 and nf4 (none: pass the flag alone)",
    )
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds for a server to load")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-gpu.md")
    args = parser.parse_args(argv)

    if shutil.which("nvidia-smi") is None:
        print(
            "bench/gpu_serving.py needs a CUDA GPU and nvidia-smi; run it on a GPU machine (bash bench/gpu.sh).",
            file=sys.stderr,
        )
        return 2
    import torch

    if not torch.cuda.is_available():
        print(
            "bench/gpu_serving.py: torch sees no CUDA device; install a CUDA build of torch.", file=sys.stderr
        )
        return 2

    settings = Settings()
    for name in dict.fromkeys([*args.models, *args.quantized]):  # build the demo folders first, so that no
        # server start waits on a build
        print(f"{name}: preparing ...", file=sys.stderr, flush=True)
        resolve_model_path(ModelSpec(name=name, path=name), settings.cache_dir)
    dialogues = [pair.chosen for pair in load_pairs(default_data_path(ROOT))]
    payloads = [
        {"inputs": [{"messages": d}]} for d in itertools.islice(itertools.cycle(dialogues), args.requests)
    ]

    runs = [(name, "none") for name in args.models] + [
        (n, q) for n in args.quantized for q in QUANTIZED_MODES
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, quantize in runs:
            print(f"{name} (quantize {quantize}): serving ...", file=sys.stderr, flush=True)
            results.append(measure(name, quantize, payloads, args, Path(tmp) / f"{name}-{quantize}.log"))

    report = render(args, results)
    write_section(args.out, "bench/gpu_serving.py", report)
    print(report)
    return 0


def render(args: argparse.Namespace, results: list[ModelResult]) -> str:
    lines = [
        "## Serving the demo models on the GPU (`bench/gpu_serving.py`)",
        "",
        f"GPU: {gpu_machine()}.",
        "",
        "```",
        f"python bench/gpu_serving.py --requests {args.requests} --concurrency {args.concurrency} "
        f"--repeats {args.repeats} --quantized {' '.join(args.quantized)}",
        "```",
        "",
        f"`rmserve serve --model NAME --dtype bfloat16 --device cuda --quantize Q`, default settings (`--kernels auto`: "
        f"the Triton kernels). {args.requests} HH-RLHF dialogues (chat-templated), one per request, from "
        f"{args.concurrency} concurrent clients each sending its next request when the last is answered; "
        f"a warm-up pass, then {args.repeats} timed runs. Throughput: the median run; latency: every request of "
        "the timed runs, client-side; GPU memory: peak in use on the device during the runs minus what was "
        "in use before the server started (nvidia-smi), beside the model weights.",
        "",
        "| model | quantize | kind | RMSNorms fused | tokens/s | requests/s | p50 ms | p95 ms | padding efficiency "
        "| weights GiB | GPU memory GiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.quantize} | {r.kind} | {r.fused_norms} | {r.median_run('tokens'):.0f} | "
            f"{r.median_run('requests'):.1f} | {r.latency_ms(0.5):.0f} | {r.latency_ms(0.95):.0f} | "
            f"{r.padding_efficiency:.3f} | {r.weights_bytes / 2**30:.2f} | {r.peak_mib / 1024:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
