"""Benchmark reports: each benchmark script owns one section of ``docs/benchmarks.md``.

A section lies between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``; rewriting it leaves the other
scripts' sections as they are, and a new section is appended.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

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
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {platform.python_version()}"


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
