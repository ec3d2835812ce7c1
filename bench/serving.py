"""Server throughput benchmark: rmserve vs the offline batched forward vs a naive one-request-at-a-time server.

Regimes, as RLHF trainers load a reward server (many concurrent clients, one rollout each):

- realistic: the demo model on HH-RLHF dialogues (chat-templated);
- overhead-bound: short rollouts (8 to 32 tokens) on a small, deep, narrow model whose forward is
  almost all per-call overhead, as a GPU forward is;
- short inputs on the demo model: the same rollouts where, on a CPU, compute per token dominates.

Each figure is the median of ``--repeats`` timed runs after a warm-up. Writes a markdown report.

    python bench/serving.py --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from report import machine, write_section  # bench/report.py: run as python bench/serving.py

from rmserve.batching.planning import BatchLimits, plan_offline
from rmserve.config import LoadOptions, ModelSpec, Settings
from rmserve.launch import start_server
from rmserve.models.base import reward_values
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import EncodedInput, Messages, TokenIds
from rmserve.scoring.loading import resolve_model_path
from rmserve.scoring.registry import resolve_limits
from rmserve.training.hh import default_data_path, load_pairs

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    tokens_per_s: float
    requests_per_s: float
    padding_efficiency: float | None = None


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
    reward_values(model, [encoded[i] for i in batches[0]])  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            reward_values(model, [encoded[i] for i in batch])
        seconds = time.perf_counter() - start
        runs.append(Run(tokens / seconds, len(encoded) / seconds, tokens / padded))
    return runs


def median(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


@dataclass
class Regime:
    name: str
    description: str
    model_path: Path
    payloads: list[dict]
    encoded: list[EncodedInput]
    results: dict[str, list[Run]]


def small_model(cache_dir: Path, demo_path: Path) -> Path:
    """A SmolLM2-shaped model, 30 layers deep but only 64 wide (random weights, seed 0, demo tokenizer).

    Its forward cost is almost all per-call overhead (30 layers of small kernels), as a GPU forward of a
    reward model on short inputs is: the regime where batching across requests pays most.
    """
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    target = cache_dir / "bench-small-30x64"
    if (target / "config.json").is_file():
        return target
    config = AutoConfig.from_pretrained(demo_path)
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    config.num_attention_heads, config.num_key_value_heads = 4, 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(demo_path).save_pretrained(target)
    return target


def short_rollouts(encoder, pairs, n: int) -> list[list[int]]:
    """Token ids of ``n`` short rollouts (8 to 32 tokens): the ends of real HH dialogues."""
    return [
        list(encoder.encode(Messages(messages=pair.rejected)).token_ids[-(8 + i % 25) :])
        for i, pair in zip(range(n), itertools.cycle(pairs), strict=False)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=128, help="dialogues per realistic run")
    parser.add_argument("--short-requests", type=int, default=512, help="rollouts per short-input run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    settings = Settings()
    demo_path = resolve_model_path(ModelSpec(name="demo", path="demo"), settings.cache_dir)
    small_path = small_model(settings.cache_dir, demo_path)
    models = {
        p: DenseRewardModel(p.name, p, LoadOptions(dtype="float32", device="cpu"))
        for p in (demo_path, small_path)
    }
    limits, max_length, _ = resolve_limits(settings, None, models[demo_path].info)
    encoder = models[demo_path].new_encoder(max_length)
    pairs = load_pairs(default_data_path(ROOT))
    dialogues = [pair.chosen for pair in pairs[: args.requests]]
    short_ids = short_rollouts(encoder, pairs, args.short_requests)
    short = [{"inputs": [{"input_ids": ids}]} for ids in short_ids]
    short_encoded = [encoder.encode(TokenIds(input_ids=ids)) for ids in short_ids]
    regimes = [
        Regime(
            "Realistic",
            "the demo model (SmolLM2-135M reward model) on HH-RLHF dialogues (chat-templated)",
            demo_path,
            [{"inputs": [{"messages": d}]} for d in dialogues],
            [encoder.encode(Messages(messages=d)) for d in dialogues],
            {},
        ),
        Regime(
            "Overhead-bound",
            "short rollouts (8 to 32 tokens, as token ids) on a small model, SmolLM2-shaped but 64 wide "
            "(30 layers, 3.5M parameters, random weights): per-forward overhead dominates, as on a GPU",
            small_path,
            short,
            short_encoded,
            {},
        ),
        Regime(
            "Short inputs on the demo model",
            "the same short rollouts on the demo model: on this CPU each token costs as much as the "
            "per-forward overhead of about 50 tokens, so batching gains less",
            demo_path,
            short,
            short_encoded,
            {},
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for path in models:
            mine = [r for r in regimes if r.model_path == path]
            for name, command, extra in (
                ("rmserve", None, ["--dtype", "float32", "--duplicate-cache-entries", "0"]),
                ("naive", [sys.executable, str(ROOT / "bench" / "naive_server.py"), "serve"], []),
            ):
                log = Path(tmp) / f"{name}-{path.name}.log"
                server = start_server(["--model", str(path), *extra], log, command=command)
                try:
                    for regime in mine:
                        print(f"{regime.name}: {name} ...", file=sys.stderr, flush=True)
                        regime.results[name] = measure_server(
                            server.url,
                            regime.payloads,
                            args.concurrency,
                            args.repeats,
                            rmserve=name == "rmserve",
                        )
                finally:
                    server.stop()
    for regime in regimes:
        print(f"{regime.name}: offline ...", file=sys.stderr, flush=True)
        regime.results["offline"] = measure_offline(
            models[regime.model_path], regime.encoded, limits, args.repeats
        )

    report = render(args, regimes, limits)
    write_section(args.out, "bench/serving.py", report)
    print(report)


def render(args: argparse.Namespace, regimes: list[Regime], limits: BatchLimits) -> str:
    lines = [
        "## Serving throughput (`bench/serving.py`)",
        "",
        f"Machine: {machine()}. No GPU.",
        "",
        f"Command (each figure the median of {args.repeats} timed runs after a warm-up):",
        "",
        "```",
        f"python bench/serving.py --requests {args.requests} --short-requests {args.short_requests} "
        f"--concurrency {args.concurrency} --repeats {args.repeats}",
        "```",
        "",
        f"Every request carries one input and comes from one of {args.concurrency} concurrent clients, each "
        "sending its next request when the last is answered (OpenRLHF's remote reward pattern). Server "
        f"settings: defaults (max_batch_tokens={limits.max_batch_tokens}, max_batch_size={limits.max_batch_size}, "
        f"max_join_padding={limits.max_join_padding} on CPU, max_wait_ms=2), float32. Offline: the same "
        "inputs tokenised up front, sorted by length and cut into batches under the same limits, forward "
        "time only (`rmserve score` does this). Naive: `bench/naive_server.py`, the same tokenisation and "
        "model code scoring each request alone inside its handler, as OpenRLHF's serve_rm does.",
        "",
    ]
    for regime in regimes:
        lengths = [len(e) for e in regime.encoded]
        runs = regime.results
        server = median(runs["rmserve"], "tokens_per_s")
        lines += [
            f"### {regime.name}",
            "",
            f"{len(regime.encoded)} requests: {regime.description}. Input length min {min(lengths)}, "
            f"median {statistics.median(lengths):.0f}, max {max(lengths)} tokens.",
            "",
            "| | tokens/s | requests/s | rmserve is | padding efficiency |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name in ("rmserve", "offline", "naive"):
            tps = median(runs[name], "tokens_per_s")
            effs = [r.padding_efficiency for r in runs[name] if r.padding_efficiency is not None]
            eff_text = f"{statistics.median(effs):.3f}" if effs else "-"
            ratio = "" if name == "rmserve" else f"{server / tps:.2f}x"
            lines.append(
                f"| {name} | {tps:.0f} | {median(runs[name], 'requests_per_s'):.2f} | {ratio} | {eff_text} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
