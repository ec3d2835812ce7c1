"""A device's forward thread: one forward at a time, and whether any is running or waiting.

Every model on a device shares its ``DeviceExecutor`` (forwards on one device never overlap). Its
``idle`` tells a batcher that nothing would run before its batch: the batch then goes at once instead of
waiting for company (``rmserve.batching.batcher``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class DeviceExecutor(ThreadPoolExecutor):
    """One worker thread for one device's forwards, counting the jobs given to it and not yet finished."""

    def __init__(self, device: str) -> None:
        super().__init__(1, thread_name_prefix=f"forward-{device}")
        self._lock = threading.Lock()
        self._unfinished = 0

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._lock:
            self._unfinished += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _: object) -> None:
        with self._lock:
            self._unfinished -= 1

    def idle(self) -> bool:
        """Whether no forward is running or waiting on this device."""
        with self._lock:
            return self._unfinished == 0
