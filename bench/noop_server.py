"""rmserve's own app over a backend that computes nothing: the requests per second one server process handles.

The backend (``NoopModel``) takes token ids as given (no tokenizer) and answers every batch with zero
rewards at once, so everything measured is rmserve's HTTP, validation, batching, metrics and logging
path: the ceiling a forward can only lower.

``--measure`` starts the server and loads it with autocannon (npm; a load generator written in Python
costs more CPU than the server and would be what is measured), one input of 16 token ids per request,
at 1, 32 and 128 connections, and writes its section of docs/benchmarks.md.

    python bench/noop_server.py --host 127.0.0.1 --port 8002
    npm install --prefix /tmp/ac autocannon
    python bench/noop_server.py --measure --autocannon /tmp/ac/node_modules/.bin/autocannon --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import uvicorn
from report import machine, write_section  # bench/report.py: run as python bench/noop_server.py

from rmserve.api.app import create_app
from rmserve.cli_support import configure_logging
from rmserve.config import Settings
from rmserve.launch import start_server
from rmserve.models.base import HeadOutputs, ModelInfo
from rmserve.models.inputs import EncodedInput, InputError, RewardInput, TokenIds
from rmserve.names import AGGREGATES


class NoopEncoder:
    """Token ids as given; any other input form is refused."""

    max_length = 1 << 20

    def encode_many(self, items: Sequence[RewardInput], truncation: str = "left", limit: int | None = None):
        out = []
        for item in items:
            if not isinstance(item, TokenIds):
                raise InputError("the no-op server takes token ids only: send {'input_ids': [...]}.")
            out.append(EncodedInput(tuple(item.input_ids), None, False))
        return out


class NoopModel:
    """A reward model whose forward is free: every reward is 0."""

    def __init__(self) -> None:
        self.info = ModelInfo(
            name="noop", kind="dense", architecture="none", dtype="float32", device="cpu",
            max_length=NoopEncoder.max_length, parameters=0, path="noop",
        )  # fmt: skip

    def new_encoder(self, max_length: int | None = None) -> NoopEncoder:
        return NoopEncoder()

    def score(self, batch, *, uwo_lambda, tradeoff_lambda, plan=None) -> HeadOutputs:
        rows = len(batch)
        return HeadOutputs(torch.zeros(rows, 1), None, torch.zeros(rows, len(AGGREGATES)))


def measure(autocannon: str, seconds: int, out: Path | None) -> str:
    """Requests per second and median latency at 1, 32 and 128 connections; the report section."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server([], Path(tmp) / "noop.log", command=[sys.executable, __file__])
        try:
            body = json.dumps({"inputs": [{"input_ids": list(range(1, 17))}]})
            for connections in (1, 32, 128):
                command = [autocannon, "-j", "-c", str(connections), "-d", str(seconds), "-m", "POST",
                           "-H", "content-type=application/json", "-b", body, f"{server.url}/v1/score"]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout)
                if result["non2xx"] or result["errors"]:
                    sys.exit(
                        f"{result['non2xx']} non-2xx answers, {result['errors']} errors; see the server log."
                    )
                rows.append((connections, result["requests"]["average"], result["latency"]["p50"]))
        finally:
            server.stop()
    lines = [
        "## One server process, no forward (`bench/noop_server.py --measure`)",
        "",
        f"Machine: {machine()}. No GPU.",
        "",
        "```",
        f"python bench/noop_server.py --measure --autocannon AUTOCANNON --seconds {seconds}",
        "```",
        "",
        "rmserve's app over a backend that returns zeros at once (everything else as under `rmserve serve`: "
        "validation, batcher, metrics, every request access-logged), one input of 16 token ids per request, "
        f"loaded for {seconds} s per row by autocannon on the same 2 cores.",
        "",
        "| connections | requests/s | median latency (ms) |",
        "| ---: | ---: | ---: |",
        *[f"| {c} | {rps:.0f} | {p50} |" for c, rps, p50 in rows],
    ]
    text = "\n".join(lines)
    if out is not None:
        write_section(out, "bench/noop_server.py", text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--measure", action="store_true", help="load a server of its own, write the report")
    parser.add_argument("--autocannon", default="autocannon", help="the autocannon executable (npm)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.measure:
        print(measure(args.autocannon, args.seconds, args.out))
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as rmserve serve sets it
    configure_logging("info", "text")  # as rmserve serve's defaults: every request access-logged
    settings = Settings(max_length=1 << 20, max_batch_tokens=1 << 20, duplicate_cache_entries=0)
    uvicorn.run(
        create_app(settings, models=[NoopModel()]),
        host=args.host,
        port=args.port,
        log_level="info",
        log_config=None,
        access_log=False,  # rmserve.access logs every request, as under rmserve serve
    )


if __name__ == "__main__":
    sys.exit(main())
