"""Merged vs MoE vs dense under load: one server per model, bounded headless locust at several user counts.

For each model the driver starts ``rmserve serve --model MODEL`` on 127.0.0.1, warms it up, then runs
``loadtests/locustfile.py`` headless for ``--seconds`` at each ``--users`` count (all users spawned at
once; users finish their request in flight when the time is up). It reads locust's stats CSV (request
count, failures, requests/s, latency percentiles) and the server's ``rmserve_input_tokens_total``
counter, and writes to ``--out``:

- ``compare.md``: the command, the machine, and one table row per (model, users): requests, req/s,
  tokens/s, p50/p95/p99 latency, error rate;
- ``compare.png``: throughput and latency against users, one line per model;
- ``compare.json``: the same figures, unrounded.

Tokens/s counts the tokens of the answered requests (the server's counter, read once the server is
idle), over locust's own measurement window. Latency percentiles are locust's, which rounds response
times above 100 ms to two significant digits. When ``RMSERVE_API_KEY`` is set, the servers require it
and the driver and locust send its first key.

    rmserve demo build-moe --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz   # once
    python -m loadtests.compare --models demo-merged demo-moe demo --users 1 4 16 --seconds 60
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from rmserve.launch import CLEAN_EXIT, Server, start_server

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
MAX_SECONDS = 600
MAX_USERS = 256
SHAPES = {"single": "SingleRollout", "batched": "BatchedRollouts"}


@dataclass(frozen=True)
class LoadRun:
    """One bounded locust run against one model."""

    model: str
    users: int
    requests: int
    failures: int
    requests_per_s: float
    tokens_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def locust_command() -> str:
    """The locust executable of this interpreter's environment."""
    found = shutil.which("locust") or str(Path(sys.executable).parent / "locust")
    if not Path(found).exists():
        raise SystemExit("locust is not installed: pip install -e '.[loadtest]'")
    return found


def auth_headers() -> dict[str, str]:
    """The Bearer header for the first key of ``RMSERVE_API_KEY``, when the environment sets one."""
    key = os.environ.get("RMSERVE_API_KEY", "").split(",")[0].strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def metric_value(url: str, name: str, model: str) -> float:
    """The value of metric ``name`` for ``model`` on the server's /metrics (0 before its first sample)."""
    text = httpx.get(f"{url}/metrics", timeout=30, headers=auth_headers()).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == model:
                return sample.value
    return 0.0


def wait_idle(url: str, model: str, timeout: float = 600) -> None:
    """Wait until the model's queue is empty, so the token counter covers every answered request."""
    deadline = time.monotonic() + timeout
    while metric_value(url, "rmserve_queue_depth", model) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the queue of {model} did not drain in {timeout}s")
        time.sleep(0.2)


def served_name(url: str) -> str:
    """The name the server gives its default model (a folder given as --model is served by its name)."""
    return httpx.get(f"{url}/v1/models", timeout=30, headers=auth_headers()).json()["data"][0]["id"]


def run_locust(
    url: str, *, users: int, seconds: int, shape: str, batch: int, csv_prefix: Path
) -> dict[str, str]:
    """Run locust headless and return the stats row of the score requests."""
    env = {**os.environ, "RMSERVE_LOAD_BATCH": str(batch)}
    command = [
        locust_command(), "-f", str(LOCUSTFILE), SHAPES[shape], "--host", url, "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "600",
        "--csv", str(csv_prefix), "--only-summary", "--exit-code-on-error", "0",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 660, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"locust exited with {done.returncode}:\n{done.stderr[-3000:]}")
    with Path(f"{csv_prefix}_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    name = "/v1/score [1]" if shape == "single" else f"/v1/score [{batch}]"
    if name not in rows:
        raise RuntimeError(f"locust recorded no {name!r} requests:\n{done.stderr[-3000:]}")
    return rows[name]


def measure_model(
    model: str,
    *,
    users: list[int],
    seconds: int,
    shape: str,
    batch: int,
    server_args: list[str],
    workdir: Path,
) -> list[LoadRun]:
    """Start a server for ``model``, warm it up, and run locust at each user count."""
    tag = Path(model).name
    server: Server = start_server(["--model", model, *server_args], workdir / f"{tag}.server.log",
                                  ready_timeout=1800)  # fmt: skip
    runs = []
    try:
        name = served_name(server.url)
        run_locust(server.url, users=1, seconds=5, shape=shape, batch=batch,
                   csv_prefix=workdir / f"{tag}-warmup")  # fmt: skip
        for count in users:
            wait_idle(server.url, name)
            tokens_before = metric_value(server.url, "rmserve_input_tokens_total", name)
            row = run_locust(server.url, users=count, seconds=seconds, shape=shape, batch=batch,
                             csv_prefix=workdir / f"{tag}-u{count}")  # fmt: skip
            wait_idle(server.url, name)
            tokens = metric_value(server.url, "rmserve_input_tokens_total", name) - tokens_before
            requests = int(row["Request Count"])
            requests_per_s = float(row["Requests/s"])
            window = requests / requests_per_s if requests_per_s else float("nan")
            run = LoadRun(
                model=tag, users=count, requests=requests, failures=int(row["Failure Count"]),
                requests_per_s=requests_per_s, tokens_per_s=tokens / window if requests else 0.0,
                p50_ms=float(row["50%"]), p95_ms=float(row["95%"]), p99_ms=float(row["99%"]),
            )  # fmt: skip
            runs.append(run)
            print(f"{tag} users={count}: {runs[-1]}", file=sys.stderr, flush=True)
    finally:
        code = server.stop(timeout=600)
        if code != CLEAN_EXIT:
            raise RuntimeError(f"the {tag} server exited with {code}:\n{server.log_text()[-3000:]}")
    return runs


def markdown(runs: list[LoadRun], command: str, shape: str, batch: int, seconds: int) -> str:
    """The report: command, machine, table, plot."""
    inputs = "one HH dialogue" if shape == "single" else f"{batch} HH dialogues"
    lines = [
        "# Load test: merged vs MoE vs dense",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
        f"Each row is one headless locust run of {seconds} s; every user posts {inputs} per request "
        "with no think time beyond 0 to 50 ms. Tokens/s counts the chat-templated tokens of answered "
        "requests. Latencies are locust's (rounded to two significant digits above 100 ms).",
        "",
        "| model | users | requests | req/s | tokens/s | p50 ms | p95 ms | p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| {r.model} | {r.users} | {r.requests} | {r.requests_per_s:.2f} | {r.tokens_per_s:.0f} | "
            f"{r.p50_ms:.0f} | {r.p95_ms:.0f} | {r.p99_ms:.0f} | {100 * r.error_rate:.1f}% |"
        )
    lines += ["", "![throughput and latency against users](compare.png)", ""]
    return "\n".join(lines)


def plot(runs: list[LoadRun], path: Path) -> None:
    """Tokens/s and p50/p95 latency against users, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for model in dict.fromkeys(r.model for r in runs):
        mine = [r for r in runs if r.model == model]
        users = [r.users for r in mine]
        left.plot(users, [r.tokens_per_s for r in mine], marker="o", label=model)
        (line,) = right.plot(users, [r.p50_ms / 1000 for r in mine], marker="o", label=f"{model} p50")
        right.plot(users, [r.p95_ms / 1000 for r in mine], marker="x", linestyle="--",
                   color=line.get_color(), label=f"{model} p95")  # fmt: skip
    counts = sorted({r.users for r in runs})
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(c) for c in counts])
        axis.set_ylim(bottom=0)
        axis.set_xlabel("concurrent users")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    left.set_ylabel("tokens/s")
    left.set_title("throughput")
    right.set_ylabel("latency (s)")
    right.set_title("latency")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--models", nargs="+", default=["demo-merged", "demo-moe", "demo"],
                        help="served model names or folders, one server each")  # fmt: skip
    parser.add_argument("--users", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--seconds", type=int, default=60, help=f"per run, at most {MAX_SECONDS}")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="single")
    parser.add_argument("--batch", type=int, default=16, help="dialogues per request with --shape batched")
    parser.add_argument("--server-arg", action="append", default=[], dest="server_args",
                        help="extra flag for rmserve serve (repeat; e.g. --server-arg=--dtype=bfloat16)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "loadtests")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be between 1 and {MAX_SECONDS}")
    if not all(1 <= u <= MAX_USERS for u in args.users):
        parser.error(f"every --users count must be between 1 and {MAX_USERS}")
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    locust_command()

    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[LoadRun] = []
    with tempfile.TemporaryDirectory(prefix="rmserve-compare-") as workdir:
        for model in args.models:
            runs += measure_model(model, users=sorted(args.users), seconds=args.seconds, shape=args.shape,
                                  batch=args.batch, server_args=args.server_args, workdir=Path(workdir))  # fmt: skip
    command = " ".join(["python -m loadtests.compare", *(argv if argv is not None else sys.argv[1:])])
    (args.out / "compare.md").write_text(markdown(runs, command, args.shape, args.batch, args.seconds))
    (args.out / "compare.json").write_text(
        json.dumps([asdict(r) | {"error_rate": r.error_rate} for r in runs], indent=2) + "\n"
    )
    plot(runs, args.out / "compare.png")
    print(f"wrote {args.out / 'compare.md'} and compare.png", file=sys.stderr)
    if any(r.failures for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
