"""Where the kernel tests run: the GPU, else Triton's CPU interpreter, in a child pytest if need be.

Kernel tests take the ``kernel_device`` fixture: the GPU when there is one, else the CPU in Triton's
interpreter, in float32 only (the interpreter computes bfloat16 ``tl.dot`` wrongly).

Why the interpreter runs in a child process. Triton decides interpreted-or-compiled once per process, when
it is first imported: its own ``tl.zeros``, ``tl.sum``... are ``triton.jit`` functions made then, so
setting ``TRITON_INTERPRET`` later (monkeypatch in a test, or even at the top of a test module) does not work
in triton 3.7.1. And tests/conftest.py imports transformers, which imports torch._dynamo, which imports
triton, before any test module is collected. So without a GPU, and unless ``TRITON_INTERPRET=1`` was
exported before pytest started (then everything runs in this process), the kernel tests skip and
``test_kernel_tests_in_the_triton_interpreter`` reruns their module in a child pytest with
``TRITON_INTERPRET=1`` exported; nothing leaks into other test modules.

tests/conftest.py loads this module as a plugin, for the fixture (the child pytest, which skips conftest
files, takes ``-p tests.interpreter``). A kernel test module binds ``rerun_in_the_interpreter`` to the name
``test_kernel_tests_in_the_triton_interpreter``, which pytest collects there. The autotune helpers check a
``TunedKernel`` in this process's mode, and let the interpreter run tiles it would never pick itself.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from rmserve_kernels.tuning import TunedKernel, TuningSpace, autotuned

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Whether this process's triton interprets: TRITON_INTERPRET=1 was exported before pytest started.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the kernels run: the GPU, else the CPU if this process's triton interprets."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not INTERPRETING:
        pytest.skip("no GPU: run under TRITON_INTERPRET=1 by test_kernel_tests_in_the_triton_interpreter")
    return torch.device("cpu")


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETING, reason="the kernel tests run in this process")
def rerun_in_the_interpreter(request: pytest.FixtureRequest) -> None:
    """Rerun the test module this test is collected in, in a child pytest whose triton interprets."""
    # --noconftest: tests/conftest.py imports transformers (slow); -p loads this module's fixture instead.
    test_module = str(request.path)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest"]
    command += ["-p", "tests.interpreter", test_module]
    child = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = child.stdout[-8000:] + child.stderr[-2000:]
    assert child.returncode == 0, report
    # Everything ran but this test: a kernel test that skipped in the child would hide a broken setup.
    assert re.search(r"\b\d+ passed, 1 skipped\b", child.stdout), report


def assert_autotuned_only_when_compiled(tuned: TunedKernel, space: TuningSpace) -> None:
    """``tuned`` has one tile in the interpreter (which cannot time configs), every candidate when compiled.

    Every output is stored once per launch, so timing trials need no reset between them.
    """
    assert tuned.interpreted == INTERPRETING
    assert len(tuned.configs) == (1 if INTERPRETING else len(space.candidates))
    assert tuned.autotuner.reset_to_zero == [] and tuned.autotuner.restore_value == []


def launch_candidate_alone(
    monkeypatch: pytest.MonkeyPatch, module: types.ModuleType, name: str, index: int
) -> None:
    """Make ``module.<name>``, a ``TunedKernel``, launch only its candidate ``index``, in this process's mode.

    A single config is launched without timing, so the interpreter checks the results of a CUDA tile.
    """
    tuned: TunedKernel = getattr(module, name)
    tile = tuned.space.candidates[index]
    single = TuningSpace((tile,), tile, tuned.space.dot_sides)
    monkeypatch.setattr(module, name, autotuned(tuned.kernel, single, ()))
