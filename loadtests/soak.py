"""Soak run: sustained load on a running server, with zero errors and bounded memory growth after warm-up.

Clients post HH-RLHF dialogues (one per request) from ``--concurrency`` threads for ``--seconds``;
the server's resident memory (``VmRSS`` of ``--pid``, read from /proc) is sampled after the warm-up
and at the end. Exits 1 if any request failed or memory grew by more than ``--max-growth``.

    rmserve serve --model demo & python -m loadtests.soak --url http://127.0.0.1:8000 --pid $! --seconds 600
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from rmserve.hh import default_data_path, load_pairs

ROOT = Path(__file__).resolve().parents[1]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}; is it running on Linux?")


@dataclass(frozen=True)
class SoakReport:
    requests: int
    errors: int
    seconds: float
    rss_after_warmup: int
    rss_end: int

    @property
    def growth(self) -> float:
        return self.rss_end / self.rss_after_warmup - 1


def soak(
    url: str,
    pid: int,
    *,
    seconds: float,
    warmup_requests: int = 50,
    concurrency: int = 8,
    model: str | None = None,
) -> SoakReport:
    """Warm up, sample memory, load for ``seconds``, sample memory again."""
    dialogues = [p.chosen for p in load_pairs(default_data_path(ROOT))]
    counts = {"requests": 0, "errors": 0}
    lock = threading.Lock()

    def post(client: httpx.Client, index: int) -> None:
        body = {"inputs": [{"messages": dialogues[index % len(dialogues)]}]} | (
            {"model": model} if model else {}
        )
        ok = False
        try:
            ok = client.post(f"{url}/v1/score", json=body, timeout=600).status_code == 200
        except httpx.HTTPError:
            ok = False
        with lock:
            counts["requests"] += 1
            counts["errors"] += not ok

    with httpx.Client() as client:
        for i in range(warmup_requests):
            post(client, i)
    warm = rss_bytes(pid)
    counts.update(requests=0, errors=0)
    deadline = time.monotonic() + seconds
    started = time.monotonic()

    def worker(offset: int) -> None:
        with httpx.Client() as client:
            i = offset
            while time.monotonic() < deadline:
                post(client, i)
                i += concurrency

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return SoakReport(counts["requests"], counts["errors"], time.monotonic() - started, warm, rss_bytes(pid))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, required=True, help="the server's process id")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-growth", type=float, default=0.05)
    args = parser.parse_args(argv)
    report = soak(args.url, args.pid, seconds=args.seconds, concurrency=args.concurrency, model=args.model)
    print(json.dumps(asdict(report) | {"growth": round(report.growth, 4)}, indent=2))
    if report.errors or report.growth > args.max_growth:
        sys.exit(1)


if __name__ == "__main__":
    main()
