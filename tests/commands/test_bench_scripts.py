"""The GPU benchmark scripts on a machine without a GPU: they refuse clearly, and the smoke run passes.

``bench/gpu.sh`` and ``bench/kernel_bench.py`` time a CUDA GPU; here they must stop at once with a message
saying so (and how to run them) rather than half-run. ``bench/kernel_bench.py --smoke`` runs every kernel case
once at tiny shapes in Triton's CPU interpreter and checks it against its torch reference: it proves the
script runs. Each runs in a child process, since triton fixes interpreting-or-compiling when first imported
(see tests/kernels/test_head_kernel.py).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
HAS_GPU = torch.cuda.is_available() or shutil.which("nvidia-smi") is not None

needs_no_gpu = pytest.mark.skipif(HAS_GPU, reason="on a GPU machine these scripts run the real benchmark")


def run(command: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=tmp_path,  # not the repository: nothing may depend on the working directory
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )


@needs_no_gpu
def test_gpu_sh_without_a_gpu_stops_with_one_clear_message(tmp_path: Path):
    child = run(["bash", str(REPO / "bench" / "gpu.sh")], tmp_path)
    assert child.returncode != 0
    assert child.stdout == ""  # stopped before doing anything
    lines = child.stderr.strip().splitlines()
    assert len(lines) == 1, child.stderr
    assert re.match(r"bench/gpu\.sh: needs a CUDA GPU.*nvidia-smi", lines[0]), child.stderr


@needs_no_gpu
def test_kernel_benchmark_without_cuda_exits_2_and_says_how_to_run_it(tmp_path: Path):
    out = tmp_path / "benchmarks-gpu.md"
    child = run([sys.executable, str(REPO / "bench" / "kernel_bench.py"), "--out", str(out)], tmp_path)
    assert child.returncode == 2, child.stderr
    assert "CUDA GPU" in child.stderr and "bash bench/gpu.sh" in child.stderr and "--smoke" in child.stderr
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_benchmark_smoke_runs_every_case_in_the_interpreter(tmp_path: Path):
    out = tmp_path / "benchmarks-gpu.md"
    child = run(
        [sys.executable, str(REPO / "bench" / "kernel_bench.py"), "--smoke", "--out", str(out)],
        tmp_path,
        TRITON_INTERPRET="1",
    )
    report = child.stdout[-4000:] + child.stderr[-4000:]
    assert child.returncode == 0, report
    summary = re.search(r"(\d+) cases, 0 outside tolerance", child.stdout)
    assert summary and int(summary.group(1)) >= 100, report
    for family in ("heads, pooled", "heads, positions", "MoE routing", "MoE grouped SwiGLU", "RMSNorm"):
        assert f"| {family} |" in child.stdout, family
    assert not out.exists()  # the smoke run writes no report
