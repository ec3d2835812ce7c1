"""Split forwards on a CPU (``--cpu-row-threads N``): a batch's parts run side by side, each on its share
of the cores.

One forward with its matmuls split over every core keeps the cores waiting on each other at every
operation (small matrices, one barrier each). Cut the batch into N parts instead (packed rows, or
slices of a padded batch) and run each part's forward on its own thread with ``cores / N`` torch
threads: the parts need no synchronisation until their results are joined. Measured on 2 cores
(``bench/peers.py``, docs/benchmarks.md). A batch of one input does not split and keeps every core.

Each part runs in the calling thread's grad, inference and autocast modes (torch keeps them per
thread), so a split forward computes what the unsplit one does, part by part.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


class RowThreads:
    """``count`` threads for the parts of one forward: the caller's and ``count - 1`` helpers.

    Args:
        count: parts run at once (at least 2).
        cores: torch threads shared among them (default: torch's threads now).
    """

    def __init__(self, count: int, cores: int | None = None) -> None:
        if count < 2:
            raise ValueError("a split forward needs at least 2 threads; use None for unsplit forwards.")
        self.count = count
        self.cores = cores or torch.get_num_threads()
        self.torch_threads = max(1, self.cores // count)
        self._helpers = ThreadPoolExecutor(count - 1, thread_name_prefix="forward-part")

    def map(self, fn: Callable[[T], R], parts: Sequence[T]) -> list[R]:
        """``fn`` of every part, in order: part 0 on the calling thread, the rest on the helpers, all in
        the caller's grad, inference and autocast modes, each with ``torch_threads`` torch threads."""
        if len(parts) < 2:
            return [fn(p) for p in parts]
        modes = (
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cpu"),
        )
        futures = [self._helpers.submit(self._part, modes, fn, p) for p in parts[1:]]
        own = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            first = fn(parts[0])
        finally:
            torch.set_num_threads(own)
        return [first, *(f.result() for f in futures)]

    def _part(self, modes: tuple[bool, bool, bool, torch.dtype], fn: Callable[[T], R], part: T) -> R:
        """One part on a helper thread. ``torch.set_num_threads`` sets the calling thread's count and the
        default of threads not yet started: the default goes back to every core after the part."""
        grad, inference, autocast, dtype = modes
        torch.set_num_threads(self.torch_threads)
        try:
            with (
                torch.set_grad_enabled(grad),
                torch.inference_mode(inference),
                torch.autocast("cpu", dtype=dtype, enabled=autocast),
            ):
                return fn(part)
        finally:
            torch.set_num_threads(self.cores)


@functools.cache
def row_threads(count: int) -> RowThreads | None:
    """The process's split-forward threads for ``count`` parts (shared by every model on the CPU); None
    for 1 (unsplit forwards)."""
    return RowThreads(count) if count > 1 else None


def split_evenly(count: int, parts: int) -> list[range]:
    """``range(count)`` cut into at most ``parts`` consecutive slices of nearly equal size."""
    parts = max(1, min(parts, count))
    size, extra = divmod(count, parts)
    bounds = [0]
    for k in range(parts):
        bounds.append(bounds[-1] + size + (1 if k < extra else 0))
    return [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]
