"""What the client library costs a PPO loop: its overhead per 256-rollout call against the demo server.

Three timings of the same 256 HH-RLHF rollouts (a user turn and the assistant's reply, as messages):

- client: ``RewardClient.score_messages`` end to end (payload building, chunking, HTTP, parsing);
- raw: the same request bodies, serialised beforehand, posted concurrently with plain httpx (the floor);
- client alone: ``score_messages`` against an in-process transport that answers a canned response,
  i.e. the client's own work with no server.

Overhead = (client - raw) / client; the client-alone time bounds it from the other side.

    python bench/client.py --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from report import machine, write_section  # bench/report.py: run as python bench/client.py

from rmserve.launch import start_server
from rmserve.training.hh import default_data_path, load_pairs
from rmserve_client import RewardClient

ROOT = Path(__file__).resolve().parents[1]


def rollouts(count: int) -> list[list[dict[str, str]]]:
    """The last user turn and assistant reply of the first HH dialogues, ``count`` of them."""
    out = []
    for pair in load_pairs(default_data_path(ROOT)):
        for dialogue in (pair.chosen, pair.rejected):
            if len(dialogue) >= 2 and dialogue[-2]["role"] == "user":
                out.append([dict(dialogue[-2]), dict(dialogue[-1])])
            if len(out) == count:
                return out
    raise ValueError(f"the data holds fewer than {count} usable rollouts.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rollouts", type=int, default=256)
    parser.add_argument(
        "--chunk-size", type=int, default=64, help="inputs per request (the client's chunking)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    conversations = rollouts(args.rollouts)
    chunks = [conversations[i : i + args.chunk_size] for i in range(0, len(conversations), args.chunk_size)]
    bodies = [
        json.dumps({"model": "demo", "inputs": [{"messages": c} for c in chunk]}).encode() for chunk in chunks
    ]
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(
            ["--model", "demo", "--dtype", "float32", "--duplicate-cache-entries", "0"],
            Path(tmp) / "server.log",
            ready_timeout=900,
        )
        try:
            client = RewardClient(
                server.url, chunk_size=args.chunk_size, max_concurrency=len(chunks), timeout=900
            )
            raw = httpx.Client(base_url=server.url, timeout=900)
            client.score_messages(conversations[:8], model="demo")  # warm-up
            times: dict[str, list[float]] = {"client": [], "raw": []}
            canned = None
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = client.score_messages(conversations, model="demo")
                times["client"].append(time.perf_counter() - start)
                start = time.perf_counter()
                with ThreadPoolExecutor(len(bodies)) as pool:  # concurrent, as the client sends its chunks
                    replies = list(
                        pool.map(
                            lambda b: raw.post(
                                "/v1/score", content=b, headers={"content-type": "application/json"}
                            ),
                            bodies,
                        )
                    )
                times["raw"].append(time.perf_counter() - start)
                canned = [r.json() for r in replies]
            raw.close()
            client.close()
        finally:
            server.stop()
    assert canned is not None and len(result.rewards) == args.rollouts
    tokens = sum(r["usage"]["input_tokens"] for r in canned)
    answers = iter(canned * (10 * args.repeats))

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=next(answers))

    offline = RewardClient(
        "http://rmserve.invalid", chunk_size=args.chunk_size, transport=httpx.MockTransport(handler)
    )
    alone = []
    for _ in range(10 * args.repeats):
        start = time.perf_counter()
        offline.score_messages(conversations, model="demo")
        alone.append(time.perf_counter() - start)
    offline.close()

    client_s, raw_s, alone_s = (statistics.median(t) for t in (times["client"], times["raw"], alone))
    overhead = (client_s - raw_s) / client_s
    lines = [
        "## Client overhead (`bench/client.py`)",
        "",
        f"Machine: {machine()}. No GPU; the demo model in float32, server and client on the same 2 cores.",
        "",
        "```",
        f"python bench/client.py --rollouts {args.rollouts} --chunk-size {args.chunk_size} --repeats {args.repeats}",
        "```",
        "",
        f"{args.rollouts} HH-RLHF rollouts (user turn + reply, {tokens} tokens), sent in {len(chunks)} requests of "
        f"{args.chunk_size}; medians of {args.repeats} runs (client alone: of {10 * args.repeats}).",
        "",
        "| | seconds per 256-rollout call |",
        "| --- | ---: |",
        f"| `RewardClient.score_messages`, end to end | {client_s:.3f} |",
        f"| the same bodies, pre-serialised, with plain httpx | {raw_s:.3f} |",
        f"| the client alone (canned answers, no server) | {alone_s:.4f} |",
        "",
        f"Client overhead: {overhead:+.2%} of end-to-end time (target < 5%); its own work alone is "
        f"{alone_s / client_s:.2%} of it.",
    ]
    report = "\n".join(lines) + "\n"
    write_section(args.out, "bench/client.py", report)
    print(report)


if __name__ == "__main__":
    main()
