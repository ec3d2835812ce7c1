"""How long ``rmserve serve`` (the default demos) takes to answer /ready, on a fresh cache and on a warm one.

Starts ``rmserve serve --cache-dir <new empty folder>`` on 127.0.0.1, as ``make serve`` does on a fresh
machine (the demos are assembled from the shipped GGUF backbone and heads, nothing is trained), waits
for /ready, stops it, starts it again on the now warm cache, and writes its section of
``docs/benchmarks.md`` with both times and the start-up phases from the server's own log.

    python bench/first_start.py [--runs 1]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

from report import machine, write_section  # bench/report.py: run as python bench/first_start.py

from rmserve.launch import CLEAN_EXIT, start_server

ROOT = Path(__file__).resolve().parents[1]
PHASES = (  # (what, a pattern of the log line that ends it, with the seconds it reports)
    ("de-quantise the GGUF backbone", r"de-quantised in ([0-9.]+)s"),
    ("save the backbone", r"saved \.smollm2-135m-instruct-backbone\S* in ([0-9.]+)s"),
    ("build the demo model (backbone included)", r"demo model ready in ([0-9.]+)s"),
)


def ready_seconds(cache_dir: Path, log: Path) -> tuple[float, str]:
    """Seconds from starting the server to /ready answering 200, and the server's log."""
    started = time.monotonic()
    server = start_server(["--cache-dir", str(cache_dir)], log, ready_timeout=900)
    seconds = time.monotonic() - started
    text = server.log_text()
    code = server.stop()
    if code != CLEAN_EXIT:
        sys.exit(f"the server did not stop cleanly (exit {code}):\n{server.log_text()}")
    return seconds, text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="fresh-cache starts to time (each in a new folder)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rmserve-first-start-") as tmp:
        for run in range(args.runs):
            cache = Path(tmp) / f"cache-{run}"
            fresh, log = ready_seconds(cache, Path(tmp) / f"fresh-{run}.log")
            warm, _ = ready_seconds(cache, Path(tmp) / f"warm-{run}.log")
            phases = {what: re.search(pattern, log) for what, pattern in PHASES}
            rows.append((fresh, warm, {k: float(m.group(1)) for k, m in phases.items() if m}))
            print(f"run {run + 1}: fresh cache {fresh:.1f}s, warm cache {warm:.1f}s", file=sys.stderr)
    lines = [
        "## First start: `rmserve serve` with no model",
        "",
        f"`python bench/first_start.py --runs {args.runs}`: seconds from starting `rmserve serve --cache-dir "
        "<empty folder>` (the default demos: demo, demo-brme, demo-ensemble, built from the shipped GGUF "
        "backbone and heads; nothing trained or downloaded) until `/ready` answers 200, then again on the "
        f"now warm cache. Machine: {machine()}.",
        "",
        "| run | fresh cache | warm cache | " + " | ".join(what for what, _ in PHASES) + " |",
        "| ---: | ---: | ---: | " + " | ".join("---:" for _ in PHASES) + " |",
    ]
    for run, (fresh, warm, phases) in enumerate(rows, 1):
        cells = " | ".join(f"{phases[what]:.1f} s" if what in phases else "-" for what, _ in PHASES)
        lines.append(f"| {run} | {fresh:.1f} s | {warm:.1f} s | {cells} |")
    lines += [
        "",
        "The phases are the server's own log timings within the fresh start: the backbone is de-quantised "
        "once and saved, the demo model is built from it, and the three models then load and warm up.",
    ]
    write_section(args.out, "bench/first_start.py", "\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
