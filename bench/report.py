"""Shared benchmark helpers: interleaved timing of models, and report sections.

Each benchmark script owns one section of ``docs/benchmarks.md``.

A section lies between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``; rewriting it leaves the other
scripts' sections as they are, and a new section is appended.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rmserve.models.base import Encoded, RewardModel, lambdas_for

TITLE = "# Benchmarks\n\nEach section is written by the script it names; rerun the script to refresh it.\n"


def machine() -> str:
    """CPU model, torch threads and versions, for the report."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} torch thread{'s' if threads != 1 else ''}, torch {torch.__version__}, Python {platform.python_version()}"


def write_section(path: Path, name: str, markdown: str) -> None:
    """Replace (or append) section ``name`` of the report at ``path`` with ``markdown``."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.is_file() else TITLE
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def read_section(path: Path, name: str) -> str | None:
    """The markdown of section ``name`` of the report at ``path``, or None where it has none."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = path.read_text() if path.is_file() else ""
    if begin not in text or end not in text:
        return None
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def timed_pass(model: RewardModel, encoded: Sequence[Encoded], batches: list[list[int]]) -> float:
    """Seconds to score every batch (forward, heads and aggregates)."""
    start = time.perf_counter()
    for batch in batches:
        model.score([encoded[i] for i in batch], **lambdas_for(model.info.defaults, len(batch)))
    return time.perf_counter() - start


def interleaved(
    models: dict[str, tuple[RewardModel, list, list[list[int]]]], repeats: int
) -> dict[str, float]:
    """Median seconds per model, runs interleaved, after one warm-up batch each."""
    for model, encoded, batches in models.values():
        timed_pass(model, encoded, batches[:1])
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # rotate: no position bias
            model, encoded, batches = models[name]
            times[name].append(timed_pass(model, encoded, batches))
            print(f"run {repeat + 1}/{repeats} {name}: {times[name][-1]:.2f}s", file=sys.stderr, flush=True)
    return {name: statistics.median(t) for name, t in times.items()}


def gpu_machine() -> str:
    """The GPU, CUDA, torch and triton, for the reports (needs CUDA)."""
    import triton

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return (
        f"{props.name} (sm{props.major}{props.minor}, {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, torch {torch.__version__}, "
        f"triton {triton.__version__}, Python {platform.python_version()}"
    )
