"""Which implementation runs: Triton kernels or their torch references, decided once at model load.

One policy for every kernel module: ``reference`` is plain torch; ``triton`` is the kernels or an
error saying why they cannot run; ``auto`` is Triton on CUDA and the references elsewhere, and never
falls back silently (on CUDA without Triton it raises). The checks that the kernels can run (Triton
installed, a CUDA device or the interpreter, triton imported in the mode ``TRITON_INTERPRET`` asks for)
live here too, for the selection and for the kernels' functions called directly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from rmserve.names import KernelsName


def interpreting() -> bool:
    """Whether Triton kernels are to run in its CPU interpreter (read at call time, never at import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_kernel_mode(interpret: bool, jit_kernels: Sequence[object]) -> None:
    """Raise a ValueError unless ``jit_kernels`` run in the mode TRITON_INTERPRET asks for now.

    ``triton.jit`` made the kernels, and triton's own library (``tl.zeros``), in the mode of their import;
    they differ if TRITON_INTERPRET changed between the first import of triton and the kernel module's, or
    since.

    Args:
        interpret: whether TRITON_INTERPRET asks for the interpreter now (``interpreting()``).
        jit_kernels: the ``triton.jit`` functions of one kernel module (so triton is installed).
    """
    import triton  # imported already by the kernel module that made jit_kernels
    import triton.language as tl

    for kernel in jit_kernels:
        interpreted = not isinstance(kernel, triton.runtime.JITFunction)
        if interpret != interpreted or type(kernel) is not type(tl.zeros):
            mode = "interpreted" if not isinstance(tl.zeros, triton.runtime.JITFunction) else "compiled"
            raise ValueError(
                f"TRITON_INTERPRET is {os.environ.get('TRITON_INTERPRET')!r} now, but triton was imported in "
                f"{mode} mode and fixes interpreting-or-compiling at import. Hint: export TRITON_INTERPRET=1 "
                "(CPU tests) or leave it unset (CUDA) before the process starts."
            )


def require_triton(
    name: str, device: torch.device, jit_kernels: Sequence[object] | None, *, instead: str
) -> None:
    """Raise a ValueError saying how to fix it unless the Triton function ``name`` can run on ``device`` now.

    Args:
        name: the function called, for the messages (``rmsnorm_triton``).
        device: where its tensors are.
        jit_kernels: the ``triton.jit`` functions it launches; None where Triton is not installed.
        instead: what to use instead, for the hints (``rmsnorm_reference (kernels='reference')``).

    Raises:
        ValueError: Triton not installed; ``device`` neither CUDA nor the CPU under ``TRITON_INTERPRET=1``;
            triton imported in the other mode.
    """
    if jit_kernels is None:
        raise ValueError(
            f"{name} needs Triton, which is not installed. Hint: pip install 'rmserve[gpu]' (or triton), or "
            f"use {instead}."
        )
    interpret = interpreting()
    if device.type != "cuda" and not interpret:
        raise ValueError(
            f"the Triton kernel needs CUDA tensors, got {device}. Hint: move the tensors to a CUDA device, "
            "export TRITON_INTERPRET=1 to run Triton's CPU interpreter (float32, slow; for tests), or use "
            f"{instead}."
        )
    check_kernel_mode(interpret, jit_kernels)


def use_triton(
    device: torch.device | str, kernels: KernelsName, *, jit_kernels: Sequence[object] | None
) -> bool:
    """Whether a model on ``device`` runs the Triton kernels ``jit_kernels`` (None: Triton not installed).

    Raises:
        ValueError: an unknown ``kernels``; Triton asked for (or ``auto`` on CUDA) but not installed;
            ``triton`` on a device that is neither CUDA nor the CPU under ``TRITON_INTERPRET=1``; a
            triton imported in the other mode (found here, at load time, rather than on the first batch).
    """
    device = torch.device(device)
    if kernels not in ("auto", "triton", "reference"):
        raise ValueError(f"kernels must be 'auto', 'triton' or 'reference', got {kernels!r}.")
    if kernels == "reference" or (kernels == "auto" and device.type != "cuda"):
        return False
    if jit_kernels is None:
        raise ValueError(
            f"kernels={kernels!r} on {device} uses the Triton kernels, but Triton is not installed. "
            "Hint: pip install 'rmserve[gpu]' (or triton), or pass kernels='reference'."
        )
    interpret = interpreting()
    if device.type != "cuda" and not interpret:
        raise ValueError(
            f"kernels='triton' needs a CUDA device, got {device}. Hint: pass kernels='auto' or 'reference', "
            "or export TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter (for tests)."
        )
    check_kernel_mode(interpret, jit_kernels)
    return True
