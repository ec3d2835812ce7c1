"""Where one server process spends its time under many small requests: a py-spy profile, summarised.

Starts ``rmserve serve`` on the small model of ``bench/peers.py`` (4 layers, 512 wide; rollouts of 8 to
32 token ids, one per request) or the no-op backend of ``bench/noop_server.py`` (``--backend noop``),
loads it from ``--concurrency`` connections (``bench/loadgen.py``), and records it with py-spy (sampling
every thread, idle samples included, without pausing the server). The summary gives, per thread, how
much of the time it was busy, and for the event loop thread where its busy time went (the package of
the innermost Python frame of each sample). py-spy is not a dependency of rmserve:

    pip install --target /tmp/pyspy py-spy
    python bench/profile_server.py --py-spy /tmp/pyspy/bin/py-spy --out docs/benchmarks.md
    python bench/profile_server.py --py-spy /tmp/pyspy/bin/py-spy --backend noop --out docs/benchmarks.md

``--keep DIR`` keeps the raw stacks (``flamegraph.pl`` or speedscope read them) and the server log.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from loadgen import drive  # bench/loadgen.py: run as python bench/profile_server.py
from peers import rollout_ids, small_model
from report import machine, write_section

from rmserve.config import ModelSpec, Settings
from rmserve.launch import start_server
from rmserve.scoring.loading import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::\d+)?\)$")

# the innermost frame's file decides the package a sample is charged to (first match wins)
PACKAGES = (
    ("rmserve: middleware", "rmserve/api/middleware"),
    ("rmserve: routes and dependencies", "rmserve/api/"),
    ("rmserve: scoring (served model)", "rmserve/scoring/"),
    ("rmserve: batcher", "rmserve/batching/"),
    ("rmserve: input encoding", "rmserve/models/inputs"),
    ("rmserve: metrics", "rmserve/metrics"),
    ("rmserve: logging", "rmserve/logs"),
    ("rmserve: other", "rmserve/"),
    ("uvicorn (HTTP protocol)", "uvicorn/"),
    ("starlette", "starlette/"),
    ("fastapi", "fastapi/"),
    ("pydantic", "pydantic"),
    ("prometheus_client", "prometheus_client/"),
    ("logging", "logging/"),
    ("json", "json/"),
    ("thread hops (concurrent.futures, threading)", "concurrent/futures/"),
    ("thread hops (concurrent.futures, threading)", "threading.py"),
    ("asyncio", "asyncio/"),
    ("uuid", "uuid.py"),
    ("torch", "torch/"),
    ("transformers", "transformers/"),
)
LOOP_RUNNERS = ("asyncio/runners.py", "asyncio/base_events.py", "uvicorn/server.py", "uvicorn/main.py")


def package_of(file: str) -> str:
    for name, marker in PACKAGES:
        if marker in file:
            return name
    return "other (" + file.rsplit("/", 1)[-1] + ")"


def frames_of(stack: str) -> list[tuple[str, str]]:
    """(function, file) of each frame, outermost first."""
    out = []
    for part in stack.split(";"):
        match = FRAME.match(part)
        if match:
            out.append((match["func"], match["file"]))
    return out


def summarise(raw: str) -> tuple[dict[str, tuple[int, int]], collections.Counter[str], int]:
    """Per thread (by name) its (samples, busy samples); the event loop thread's busy samples by package;
    the event loop's sample count.

    A main-thread sample is idle when its innermost frame is the event loop's own runner (the loop
    waiting in C for the next event); any other thread's sample is idle when py-spy saw it idle, so
    those threads are recorded twice (see ``record``) and only the busy recording counts here.
    """
    threads: dict[str, list[int]] = {}
    loop_packages: collections.Counter[str] = collections.Counter()
    loop_total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        head, _, rest = stack.partition(";")
        name = head.split(": ", 1)[-1] if ": " in head else head
        name = re.sub(r"_\d+$", "", name)  # ThreadPoolExecutor-0_0 and the like: one row per pool
        frames = frames_of(rest)
        entry = threads.setdefault(name, [0, 0])
        entry[0] += count
        if name != "MainThread":
            continue
        loop_total += count
        if not frames or any(frames[-1][1].endswith(r) for r in LOOP_RUNNERS):
            continue
        entry[1] += count
        loop_packages[package_of(frames[-1][1])] += count
    return {k: (v[0], v[1]) for k, v in threads.items()}, loop_packages, loop_total


def busy_samples(raw: str) -> collections.Counter[str]:
    """Samples per thread name in a recording without idle samples."""
    out: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            head = stack.partition(";")[0]
            name = head.split(": ", 1)[-1] if ": " in head else head
            out[re.sub(r"_\d+$", "", name)] += int(count_text)
    return out


async def load_while(
    process: subprocess.Popen, url: str, bodies: list[dict], concurrency: int
) -> tuple[int, float]:
    """Drive the server until ``process`` (py-spy) exits; the requests answered and the seconds."""
    done = seconds = 0.0
    while process.poll() is None:
        seconds += await drive(url, "/v1/score", bodies, concurrency)
        done += len(bodies)
    return int(done), seconds


def record(py_spy: str, pid: int, seconds: int, rate: int, out: Path, *, idle: bool) -> subprocess.Popen:
    command = [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate),
               "--format", "raw", "--output", str(out), "--threads", "--nonblocking"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(py_spy).resolve().parents[1])}  # a --target install
    return subprocess.Popen(command + (["--idle"] if idle else []), env=env, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy executable")
    parser.add_argument("--backend", choices=("small", "noop"), default="small")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=15, help="per recording (two are made)")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--server-args", default="", help="extra rmserve serve flags (small backend)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the raw stacks and server log here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    settings = Settings()
    demo_path = resolve_model_path(ModelSpec(name="demo", path="demo"), settings.cache_dir)
    ids = rollout_ids(demo_path, 512)
    bodies = [{"inputs": [{"input_ids": i}]} for i in ids]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.backend == "small":
            path = small_model(settings.cache_dir, demo_path)
            flags = ["--model", str(path), "--dtype", "float32", "--duplicate-cache-entries", "0"]
            server = start_server(flags + args.server_args.split(), work / "server.log")
        else:
            command = [sys.executable, str(ROOT / "bench" / "noop_server.py")]
            server = start_server([], work / "server.log", command=command)
        try:
            asyncio.run(drive(server.url, "/v1/score", bodies[:128], args.concurrency))  # warm-up
            rates = []
            for idle in (True, False):
                out = work / ("idle.raw" if idle else "busy.raw")
                spy = record(args.py_spy, server.process.pid, args.seconds, args.rate, out, idle=idle)
                answered, seconds = asyncio.run(load_while(spy, server.url, bodies, args.concurrency))
                if spy.wait() != 0:
                    sys.exit(f"py-spy failed (exit {spy.returncode}); run it as root or with ptrace allowed.")
                rates.append(answered / seconds)
        finally:
            server.stop()
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for name in ("idle.raw", "busy.raw", "server.log"):
                shutil.copy(work / name, args.keep / name)
        threads, loop_packages, loop_total = summarise((work / "idle.raw").read_text())
        busy = busy_samples((work / "busy.raw").read_text())
    report = render(args, threads, busy, loop_packages, loop_total, rates)
    if args.out is not None:
        write_section(args.out, f"bench/profile_server.py --backend {args.backend}", report)
    print(report)


def render(args, threads, busy, loop_packages, loop_total, rates) -> str:
    loop_busy = sum(loop_packages.values())
    lines = [
        f"## Where the time goes: {args.backend} backend under py-spy (`bench/profile_server.py`)",
        "",
        f"Machine: {machine()}. No GPU.",
        "",
        "```",
        f"python bench/profile_server.py --py-spy PY_SPY --backend {args.backend} --concurrency {args.concurrency} "
        f"--seconds {args.seconds} --rate {args.rate}"
        + (f" --server-args '{args.server_args}'" if args.server_args else ""),
        "```",
        "",
        f"{'The 4-layer, 512-wide model of `bench/peers.py`' if args.backend == 'small' else 'The no-op backend of `bench/noop_server.py`'}"
        f", one rollout of 8 to 32 token ids per request from {args.concurrency} connections (`bench/loadgen.py`, "
        f"on the same 2 cores), sampled at {args.rate} Hz for {args.seconds} s twice (with and without idle "
        f"samples); {rates[0]:.0f} and {rates[1]:.0f} requests/s answered while sampled.",
        "",
        "| thread | busy |",
        "| --- | ---: |",
    ]
    for name, (total, _) in sorted(threads.items(), key=lambda kv: -kv[1][0]):
        busy_share = (
            (loop_total and loop_busy / loop_total) if name == "MainThread" else busy[name] / max(total, 1)
        )
        label = "MainThread (event loop)" if name == "MainThread" else name
        lines.append(f"| {label} | {100 * min(busy_share, 1):.0f}% |")
    lines += ["", "The event loop's busy time, by the package of the innermost frame:", "",
              "| package | share of busy |", "| --- | ---: |"]  # fmt: skip
    for name, count in loop_packages.most_common():
        share = count / max(loop_busy, 1)
        if share >= 0.01:
            lines.append(f"| {name} | {100 * share:.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
