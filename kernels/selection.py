"""Which implementation runs: Triton kernels or their torch references, decided once at model load.

One policy for every kernel module: ``reference`` is plain torch; ``triton`` is the kernels or an
error saying why they cannot run; ``auto`` is Triton on CUDA and the references elsewhere, and never
falls back silently (on CUDA without Triton it raises).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch

KernelsChoice = Literal["auto", "triton", "reference"]


def interpreting() -> bool:
    """Whether Triton kernels are to run in its CPU interpreter (read at call time, never at import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(
    device: torch.device | str,
    kernels: KernelsChoice,
    *,
    triton_installed: bool,
    check_mode: Callable[[bool], None],
) -> bool:
    """Whether a model on ``device`` runs the Triton kernels (``check_mode`` vets the imported triton).

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
    if not triton_installed:
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
    check_mode(interpret)
    return True
