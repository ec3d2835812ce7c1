"""Per-replica throughput of each demo kind, and what Ray Serve's proxy costs: the figures docs/scaling.md
sizes a deployment from.

One ``rmserve serve`` per demo kind (demo, demo-merged, demo-moe, demo-brme, demo-ensemble; the trained
ones only once ``rmserve demo build-moe`` has built them), each loaded by ``--concurrency`` clients with
one HH-RLHF dialogue per request (``bench/loadgen.py``); then the demo through ``rmserve serve-ray`` with one
replica, to price the proxy hop. Each figure is the median of ``--repeats`` runs after a warm-up.

    python bench/scaling.py --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from loadgen import drive  # bench/loadgen.py: run as python bench/scaling.py
from report import machine, write_section

from rmserve.config import LoadOptions, ModelSpec, Settings
from rmserve.demo.build import DemoNotBuiltError, build_demo
from rmserve.launch import start_server
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import Messages
from rmserve.scoring.loading import resolve_model_path
from rmserve.training.hh import default_data_path, load_pairs

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("demo", "demo-merged", "demo-moe", "demo-brme", "demo-ensemble")


def built(name: str, settings: Settings) -> bool:
    """Whether a demo can be served without a training run (the trained demos must have been built)."""
    try:
        build_demo(name, settings.cache_dir, progress=False)
    except DemoNotBuiltError:
        return False
    return True


def measure(url: str, bodies: list[dict], concurrency: int, repeats: int) -> tuple[float, float, float]:
    """Median requests/s, and the median and 95th-percentile latency (ms) of the median run."""
    asyncio.run(drive(url, "/v1/score", bodies[:concurrency], concurrency))  # warm-up
    runs = []
    for _ in range(repeats):
        latencies: list[float] = []
        seconds = asyncio.run(drive(url, "/v1/score", bodies, concurrency, latencies))
        latencies.sort()
        runs.append(
            (len(bodies) / seconds, latencies[len(latencies) // 2], latencies[int(0.95 * len(latencies))])
        )
    runs.sort()
    rate, p50, p95 = runs[len(runs) // 2]
    return rate, 1000 * p50, 1000 * p95


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=96, help="HH dialogues, one per request")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Serve row")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    settings = Settings()
    demo_path = resolve_model_path(ModelSpec(name="demo", path="demo"), settings.cache_dir)
    encoder = DenseRewardModel("demo", demo_path, LoadOptions(dtype="float32", device="cpu")).new_encoder()
    dialogues = [p.chosen for p in load_pairs(default_data_path(ROOT))[: args.requests]]
    tokens = sum(len(encoder.encode(Messages(messages=d))) for d in dialogues)
    bodies = [{"inputs": [{"messages": d}]} for d in dialogues]
    rows: list[tuple[str, str, float, float, float]] = []
    skipped = [k for k in KINDS if not built(k, settings)]
    with tempfile.TemporaryDirectory() as tmp:
        contenders = [
            (k, "rmserve serve", [sys.executable, "-m", "rmserve", "serve"])
            for k in KINDS
            if k not in skipped
        ]
        if not args.no_ray:
            contenders.append(
                ("demo", "rmserve serve-ray, 1 replica", [sys.executable, "-m", "rmserve", "serve-ray"])
            )
        for kind, how, command in contenders:
            print(f"{kind} ({how}) ...", file=sys.stderr, flush=True)
            server = start_server(  # the cache off through the environment: serve-ray's replicas read it too
                ["--model", kind],
                Path(tmp) / f"{kind}.log",
                command=command,
                env={"RMSERVE_DUPLICATE_CACHE_ENTRIES": "0"},
            )
            try:
                rate, p50, p95 = measure(server.url, bodies, args.concurrency, args.repeats)
            finally:
                server.stop()
            rows.append((kind, how, rate, p50, p95))
    report = render(args, rows, tokens, skipped)
    if args.out is not None:
        write_section(args.out, "bench/scaling.py", report)
    print(report)


def render(args, rows, tokens: int, skipped: list[str]) -> str:
    per_request = tokens / args.requests
    lines = [
        "## Per-replica throughput of the demo kinds (`bench/scaling.py`)",
        "",
        f"Machine: {machine()}. No GPU.",
        "",
        "```",
        f"python bench/scaling.py --requests {args.requests} --concurrency {args.concurrency} --repeats {args.repeats}",
        "```",
        "",
        f"One replica (one server process on the 2 cores), {args.requests} HH-RLHF dialogues "
        f"({per_request:.0f} tokens each on average, chat-templated), one per request from {args.concurrency} "
        f"clients (`bench/loadgen.py` on the same cores); float32, duplicate cache off; median of {args.repeats} "
        "runs.",
        "",
        "| model | served by | requests/s | tokens/s | median latency (ms) | p95 latency (ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, how, rate, p50, p95 in rows:
        lines.append(f"| {kind} | {how} | {rate:.2f} | {rate * per_request:.0f} | {p50:.0f} | {p95:.0f} |")
    if skipped:
        lines += [
            "",
            f"Not measured (not built here; `rmserve demo build-moe` builds them): {', '.join(skipped)}.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
