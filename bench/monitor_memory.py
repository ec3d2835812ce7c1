"""The run monitor's memory with many distinct run ids: bounded by its settings, not by the ids seen.

    python bench/monitor_memory.py --runs 10000 --out docs/benchmarks.md

Feeds ``rmserve.monitor.RunMonitor`` (server defaults: windows of 256 inputs, 64 runs, 512 windows per run
and model, 3 baseline windows; its Prometheus gauges attached, as in the server) ``--runs`` distinct run
ids, each sending ``--inputs`` scored inputs with 4 heads and sigmas (BRME-like), and measures the
process's resident memory (``/proc/self/statm``, after a garbage collection) after every tenth of the ids.
A bounded monitor's memory levels off once ``max_runs`` runs are held; one that kept every run would grow
linearly.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time
from pathlib import Path

from report import machine, write_section  # bench/report.py: run as python bench/monitor_memory.py

from rmserve.metrics import Metrics
from rmserve.monitor import RunMonitor, Scored

ROOT = Path(__file__).resolve().parents[1]


def resident_mib() -> float:
    """The process's resident memory now, after a collection."""
    gc.collect()
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument(
        "--inputs", type=int, default=600, help="Scored inputs per run (2 windows and a part)."
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(0)
    items = [
        Scored(rng.gauss(0, 1), rng.randint(50, 400), tuple(rng.gauss(0, 1) for _ in range(4)), tuple(rng.random() for _ in range(4)))
        for _ in range(args.inputs)
    ]  # fmt: skip
    metrics = Metrics()
    monitor = RunMonitor(on_window=metrics.run_window, on_evict=metrics.run_evicted)
    base = resident_mib()
    rows = []
    started = time.perf_counter()
    step = max(1, args.runs // 10)
    for i in range(args.runs):
        for start in range(0, args.inputs, 64):  # requests of 64 inputs
            monitor.record(f"run-{i}", "demo-brme", items[start : start + 64])
        if (i + 1) % step == 0:
            labels = len(metrics.run_signal._metrics)  # the gauge's label sets
            rows.append((i + 1, resident_mib() - base, len(monitor.runs()), labels))
    seconds = time.perf_counter() - started
    lines = [
        f"`python bench/monitor_memory.py --runs {args.runs} --inputs {args.inputs}"
        + (" --out docs/benchmarks.md`" if args.out else "`"),
        "",
        f"{machine()}. Server defaults (windows of 256, 64 runs, 512 windows per run and model); each run sends "
        f"{args.inputs} inputs (4 heads with sigmas) in requests of 64. Resident memory added since the start "
        f"(after a garbage collection), after every tenth of the run ids; {seconds:.0f} s in all.",
        "",
        "| run ids seen | memory added (MiB) | runs kept | gauge label sets |",
        "| ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {seen:,} | {mib:.2f} | {kept} | {labels} |" for seen, mib, kept, labels in rows]
    section = "\n".join(lines)
    print(section)
    if args.out is not None:
        write_section(
            args.out.resolve(),
            "bench/monitor_memory.py",
            "## Run monitor memory (`bench/monitor_memory.py`)\n\n" + section,
        )


if __name__ == "__main__":
    main()
