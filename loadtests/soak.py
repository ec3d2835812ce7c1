"""Soak run: sustained load on a running server, with zero errors and bounded memory growth after warm-up.

Clients post HH-RLHF dialogues (one per request) from ``--concurrency`` threads for ``--seconds``;
the server's resident memory (``VmRSS`` of ``--pid``, read from /proc) is sampled after the warm-up
(``--warmup-requests`` at the same concurrency, so every batch size the load makes has been allocated once),
every ``--sample-every`` seconds, and at the end. Exits 1 if any request failed or memory grew by more
than ``--max-growth``. ``--out FILE`` writes a markdown report (figures and memory samples).

    rmserve serve --model demo & python -m loadtests.soak --url http://127.0.0.1:8000 --pid $! --seconds 1800 \\
        --out docs/loadtests/soak.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from rmserve.training.hh import default_data_path, load_pairs

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
    latency_p50_s: float
    latency_p99_s: float
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since warm-up, bytes)
    warmup_errors: int = 0

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
    sample_every: float = 60,
    headers: dict[str, str] | None = None,
) -> SoakReport:
    """Warm up, sample memory, load for ``seconds`` (sampling memory every ``sample_every``), sample again."""
    dialogues = [p.chosen for p in load_pairs(default_data_path(ROOT))]
    counts = {"requests": 0, "errors": 0}
    latencies: list[float] = []
    lock = threading.Lock()

    def post(client: httpx.Client, index: int) -> None:
        body = {"inputs": [{"messages": dialogues[index % len(dialogues)]}]} | (
            {"model": model} if model else {}
        )
        started = time.monotonic()
        try:
            ok = client.post(f"{url}/v1/score", json=body, timeout=600).status_code == 200
        except httpx.HTTPError:
            ok = False
        with lock:
            counts["requests"] += 1
            counts["errors"] += not ok
            latencies.append(time.monotonic() - started)

    def run(*, until: float | None = None, requests: int | None = None) -> list[threading.Thread]:
        """Start ``concurrency`` clients posting back to back, until a time or until ``requests`` are sent."""
        issued = [0]

        def worker(offset: int) -> None:
            with httpx.Client(headers=headers) as client:
                i = offset
                while until is None or time.monotonic() < until:
                    if requests is not None:
                        with lock:
                            if issued[0] >= requests:
                                return
                            issued[0] += 1
                    post(client, i)
                    i += concurrency

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(concurrency)]
        for t in threads:
            t.start()
        return threads

    # Warm-up at full concurrency, so batches of every size the load makes have been allocated once.
    for t in run(requests=warmup_requests):
        t.join()
    warm = rss_bytes(pid)
    warmup_errors = counts["errors"]
    counts.update(requests=0, errors=0)
    latencies.clear()
    started = time.monotonic()
    deadline = started + seconds
    threads = run(until=deadline)
    samples = [(0.0, warm)]
    next_sample = started + sample_every
    while any(t.is_alive() for t in threads):
        now = time.monotonic()
        if now >= next_sample:
            samples.append((round(now - started, 1), rss_bytes(pid)))
            next_sample += sample_every
        time.sleep(max(0.05, min(next_sample - now, 1.0)))
    for t in threads:
        t.join()
    end = rss_bytes(pid)
    samples.append((round(time.monotonic() - started, 1), end))
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return SoakReport(
        requests=counts["requests"],
        errors=counts["errors"],
        seconds=time.monotonic() - started,
        rss_after_warmup=warm,
        rss_end=end,
        latency_p50_s=quantiles[49],
        latency_p99_s=quantiles[98],
        rss_samples=samples,
        warmup_errors=warmup_errors,
    )


def markdown(report: SoakReport, command: str, concurrency: int) -> str:
    """The report: command, figures, memory samples."""
    mib = 1024 * 1024
    lines = [
        "# Soak run",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} cores. {concurrency} clients each post one HH dialogue per request, "
        "back to back.",
        "",
        "| requests | errors | seconds | req/s | p50 s | p99 s | RSS after warm-up | RSS at end | growth |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {report.requests} | {report.errors} | {report.seconds:.0f} | {report.requests / report.seconds:.2f} | "
        f"{report.latency_p50_s:.2f} | {report.latency_p99_s:.2f} | {report.rss_after_warmup / mib:.1f} MiB | "
        f"{report.rss_end / mib:.1f} MiB | {100 * report.growth:+.2f}% |",
        "",
        "Resident memory of the server during the run:",
        "",
        "| seconds after warm-up | RSS |",
        "| ---: | ---: |",
        *(f"| {t:.0f} | {rss / mib:.1f} MiB |" for t, rss in report.rss_samples),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, required=True, help="the server's process id")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup-requests", type=int, default=50)
    parser.add_argument("--sample-every", type=float, default=60, help="seconds between memory samples")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-growth", type=float, default=0.05)
    parser.add_argument("--api-key", default=None, help="a key the server accepts (sent as Bearer)")
    parser.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    report = soak(args.url, args.pid, seconds=args.seconds, concurrency=args.concurrency, model=args.model,
                  warmup_requests=args.warmup_requests, sample_every=args.sample_every, headers=headers)  # fmt: skip
    print(json.dumps(asdict(report) | {"growth": round(report.growth, 4)}, indent=2))
    if args.out is not None:
        shown = list(argv if argv is not None else sys.argv[1:])
        if "--api-key" in shown:
            shown[shown.index("--api-key") + 1] = "KEY"
        command = " ".join(["python -m loadtests.soak", *shown])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(report, command, args.concurrency))
    if report.errors or report.warmup_errors or report.growth > args.max_growth:
        sys.exit(1)


if __name__ == "__main__":
    main()
