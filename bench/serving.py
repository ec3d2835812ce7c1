"""Server throughput benchmark: rmserve vs the offline batched forward vs a naive one-request-at-a-time server.

Two regimes, as RLHF trainers load a reward server (many concurrent clients, one rollout each):

- realistic: the demo model on HH-RLHF dialogues (chat-templated), 32 concurrent clients;
- overhead-bound: short rollouts (8 to 32 tokens, sent as token ids), 32 concurrent clients,
  where per-forward overhead dominates as it does on a GPU.

Each figure is the median of ``--repeats`` timed runs after a warm-up. Writes a markdown report.

    python bench/serving.py --model demo --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from rmserve.batching.planning import BatchLimits, plan_offline
from rmserve.config import ModelSpec, Settings
from rmserve.hh import default_data_path, load_pairs
from rmserve.launch import start_server
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import EncodedInput, Messages, TokenIds
from rmserve.serving import resolve_limits, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    tokens_per_s: float
    requests_per_s: float
    padding_efficiency: float | None = None


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {platform.python_version()}"


async def drive(url: str, payloads: list[dict], concurrency: int) -> tuple[float, int]:
    """Send each payload as its own request from ``concurrency`` clients; return (seconds, tokens)."""
    queue = iter(payloads)
    tokens = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for payload in queue:
            r = await client.post("/v1/score", json=payload)
            r.raise_for_status()
            tokens += r.json()["usage"]["input_tokens"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return time.perf_counter() - start, tokens


def counter(metrics: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + "{"))


def measure_server(
    url: str, payloads: list[dict], concurrency: int, repeats: int, rmserve: bool
) -> list[Run]:
    asyncio.run(drive(url, payloads[:concurrency], concurrency))  # warm-up
    runs = []
    for _ in range(repeats):
        before = httpx.get(f"{url}/metrics").text if rmserve else ""
        seconds, tokens = asyncio.run(drive(url, payloads, concurrency))
        efficiency = None
        if rmserve:
            after = httpx.get(f"{url}/metrics").text
            real = counter(after, "rmserve_real_tokens_total") - counter(before, "rmserve_real_tokens_total")
            padded = counter(after, "rmserve_padded_tokens_total") - counter(
                before, "rmserve_padded_tokens_total"
            )
            efficiency = real / padded
        runs.append(Run(tokens / seconds, len(payloads) / seconds, efficiency))
    return runs


def measure_offline(
    model: DenseRewardModel, encoded: list[EncodedInput], limits: BatchLimits, repeats: int
) -> list[Run]:
    batches = plan_offline([len(e) for e in encoded], limits)
    tokens = sum(map(len, encoded))
    padded = sum(len(b) * max(len(encoded[i]) for i in b) for b in batches)
    model.score([encoded[i] for i in batches[0]])  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            model.score([encoded[i] for i in batch])
        seconds = time.perf_counter() - start
        runs.append(Run(tokens / seconds, len(encoded) / seconds, tokens / padded))
    return runs


def median(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo", help="model folder or 'demo'")
    parser.add_argument("--requests", type=int, default=128, help="dialogues per realistic run")
    parser.add_argument("--short-requests", type=int, default=512, help="rollouts per overhead-bound run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    settings = Settings()
    path = resolve_model_path(ModelSpec(name="bench", path=args.model), settings.cache_dir)
    model = DenseRewardModel("bench", path, dtype="float32", device="cpu")
    limits, max_length, _ = resolve_limits(settings, None, model.info)
    encoder = model.new_encoder(max_length)

    pairs = load_pairs(default_data_path(ROOT))
    dialogues = [pair.chosen for pair in pairs[: args.requests]]
    realistic = [{"inputs": [{"messages": d}]} for d in dialogues]
    realistic_encoded = [encoder.encode(Messages(messages=d)) for d in dialogues]
    short_ids = [
        list(encoder.encode(Messages(messages=pair.rejected)).token_ids[-(8 + i % 25) :])
        for i, pair in zip(range(args.short_requests), itertools.cycle(pairs), strict=False)
    ]
    short = [{"inputs": [{"input_ids": ids}]} for ids in short_ids]
    short_encoded = [encoder.encode(TokenIds(input_ids=ids)) for ids in short_ids]

    results: dict[str, dict[str, list[Run]]] = {"realistic": {}, "overhead-bound": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, command, extra in (
            ("rmserve", None, ["--dtype", "float32"]),
            ("naive", [sys.executable, str(ROOT / "bench" / "naive_server.py"), "serve"], []),
        ):
            server = start_server(["--model", str(path), *extra], Path(tmp) / f"{name}.log", command=command)
            try:
                for regime, payloads in (("realistic", realistic), ("overhead-bound", short)):
                    print(f"{regime}: {name} ...", file=sys.stderr, flush=True)
                    results[regime][name] = measure_server(
                        server.url, payloads, args.concurrency, args.repeats, rmserve=name == "rmserve"
                    )
            finally:
                server.stop()
    for regime, encoded in (("realistic", realistic_encoded), ("overhead-bound", short_encoded)):
        print(f"{regime}: offline ...", file=sys.stderr, flush=True)
        results[regime]["offline"] = measure_offline(model, encoded, limits, args.repeats)

    report = render(args, results, realistic_encoded, short_encoded, limits)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


def render(args, results, realistic_encoded, short_encoded, limits) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {machine()}. No GPU.",
        "",
        f"Command (each figure the median of {args.repeats} timed runs after a warm-up):",
        "",
        "```",
        f"python bench/serving.py --model {args.model} --requests {args.requests} "
        f"--short-requests {args.short_requests} --concurrency {args.concurrency} --repeats {args.repeats}",
        "```",
        "",
        f"Server settings: defaults (max_batch_tokens={limits.max_batch_tokens}, max_batch_size={limits.max_batch_size}, "
        f"max_join_padding={limits.max_join_padding}, max_wait_ms=2), float32. Offline: the same inputs tokenised up front, sorted by length and cut into "
        "batches under the same limits, forward time only. Naive: `bench/naive_server.py`, the same model code "
        "scoring each request alone inside its handler (OpenRLHF serve_rm's pattern).",
        "",
    ]
    for regime, encoded in (("realistic", realistic_encoded), ("overhead-bound", short_encoded)):
        lengths = [len(e) for e in encoded]
        runs = results[regime]
        server = median(runs["rmserve"], "tokens_per_s")
        lines += [
            f"## {regime.capitalize()}",
            "",
            f"{len(encoded)} requests of one input each from {args.concurrency} concurrent clients; input length "
            f"min {min(lengths)}, median {statistics.median(lengths):.0f}, max {max(lengths)} tokens.",
            "",
            "| | tokens/s | requests/s | vs rmserve | padding efficiency |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name in ("rmserve", "offline", "naive"):
            tps = median(runs[name], "tokens_per_s")
            eff = runs[name][0].padding_efficiency
            eff_text = (
                "-" if eff is None else f"{statistics.median(r.padding_efficiency for r in runs[name]):.3f}"
            )
            lines.append(
                f"| {name} | {tps:.0f} | {median(runs[name], 'requests_per_s'):.2f} | {server / tps:.2f}x | {eff_text} |"
            )
        lines += [
            "",
            f"rmserve / offline = {server / median(runs['offline'], 'tokens_per_s'):.2f}; "
            f"rmserve / naive = {server / median(runs['naive'], 'tokens_per_s'):.2f}.",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
