"""Launch configurations of the Triton kernels: the autotune candidates and the one the interpreter runs.

This module owns how every kernel module (``rmserve_kernels.heads``, ``rmserve_kernels.routing``,
``rmserve_kernels.experts``, ``rmserve_kernels.rmsnorm``) turns its candidate tiles into a
``triton.autotune`` launcher; each kernel module lists its own candidates, and says why, in its docstring.
The rules they share:

- **Compiled for CUDA**, a kernel is wrapped in ``triton.autotune`` over its candidates. The first launch
  for each key (the sizes that move the best tile: hidden size, number of heads or experts, a power-of-two
  bucket of the rows, and the dtypes of the tensors, which triton adds by itself) compiles and times every
  candidate that ``TuningSpace.fits`` the launch; later launches with that key reuse the fastest. The
  timings are cached on disk (``cache_results``), so a restarted server does not time them again. Keys never
  hold a raw batch size: a served batch size changes with every batch, and would time the candidates again
  on every one of them.
- **The candidates** are for A100 (sm80) and H100 (sm90) GPUs: tiles of 16 to 128 rows (16 spreads a small
  batch over many SMs, 64 and 128 read each weight tile once for more rows); 4 warps for tiles of up to
  32 x 128 elements and 8 for larger ones, so a thread holds tens of float32 accumulators, not hundreds;
  2 to 4 pipeline stages, which overlap the asynchronous global-to-shared copies of the next chunk of the
  reduction with the ``tl.dot`` of this one (164 KB of shared memory per SM on A100, 228 KB on H100: room
  for 3-4 stages of the bfloat16 tiles, fewer of the widest float32 ones). A candidate that does not fit a
  particular GPU fails to compile (``OutOfResources``) and the autotuner counts it as infinitely slow, so
  it is never chosen. Lists are kept short (7 or 8): each candidate costs one compile, once per process
  and dtype, and ~0.1 s of timing on the first launch of each key.
- **Under the interpreter** (``TRITON_INTERPRET=1``) there is exactly one config, ``TuningSpace.interpreter``:
  the interpreter runs programs one after the other in numpy and cannot time anything, and with a single
  config ``triton.autotune`` neither prunes nor times. Launches go through the same autotuner in both
  modes, so the interpreter tests exercise the launch code that CUDA runs.
- **Tuned meta-parameters are never passed at launch** (``triton.autotune`` refuses the conflict) and the
  grid is a function of the chosen config. Block sizes fixed by the problem (a tile that must cover every
  head or expert) stay launch arguments and are not tuned.
- **tl.dot needs every tile side >= 16**: ``TuningSpace`` refuses a smaller block among its ``dot_sides``.
- **No kernel here accumulates into memory**: each stores every output element once per launch, from
  registers, so timing a config (which launches it many times) leaves the outputs as one launch does, and
  none needs ``reset_to_zero`` or ``restore_value``. A kernel that adds into its outputs (atomics, split-K)
  must name them in ``reset_to_zero`` so each trial starts from zeros.
- ``triton.autotune``'s launcher keeps per-launch state on itself (the arguments being tuned on, the best
  config), so ``TunedKernel`` launches under a lock: two device threads never interleave inside it. The
  lock is held while the launch is enqueued (microseconds; the GPU work is asynchronous), and for the
  whole timing on the first launch of a key.

Triton is optional: without it this module imports and ``Tile`` / ``TuningSpace`` work (kernel modules
declare their spaces at import); ``tuning_configs`` and ``TunedKernel`` need it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

try:
    import triton
except ImportError:  # CPU-only installs: no kernel is built, nothing here is called
    triton = None

__all__ = ["MIN_DOT_SIDE", "Tile", "TunedKernel", "TuningSpace", "autotuned", "size_bucket", "tuning_configs"]

MIN_DOT_SIDE = 16
"""The smallest side of a ``tl.dot`` operand tile."""

Fits = Callable[[Mapping[str, Any]], bool]
"""Whether a candidate suits a launch, given the launch's arguments and the candidate's blocks, by name."""


def _is_power_of_two(value: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class Tile:
    """One launch configuration: block sizes (tl.constexpr meta-parameters), warps and pipeline stages.

    Attributes:
        blocks: each tuned meta-parameter's value, e.g. ``{"BLOCK_B": 16, "BLOCK_H": 64}``; powers of two.
        num_warps: warps per program, a power of two.
        num_stages: software-pipelining stages of the kernel's loops, >= 1.
    """

    blocks: Mapping[str, int]
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name, size in self.blocks.items():
            if not _is_power_of_two(size):
                raise ValueError(f"block {name}={size!r} is not a power of two; triton tiles are.")
        if not _is_power_of_two(self.num_warps):
            raise ValueError(f"num_warps={self.num_warps!r} must be a power of two (1, 2, 4, 8, ...).")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages!r} must be an integer >= 1.")

    def __hash__(self) -> int:  # blocks is a mapping: hash its items
        return hash((tuple(sorted(self.blocks.items())), self.num_warps, self.num_stages))

    def config(self) -> Any:
        """This tile as a ``triton.Config``."""
        return triton.Config(dict(self.blocks), num_warps=self.num_warps, num_stages=self.num_stages)


@dataclass(frozen=True)
class TuningSpace:
    """Every launch configuration of one kernel.

    Attributes:
        candidates: the tiles timed on CUDA.
        interpreter: the one tile run under ``TRITON_INTERPRET=1``; valid for any problem size.
        dot_sides: the tuned blocks that are a side of a ``tl.dot`` operand (each >= ``MIN_DOT_SIDE``).
        fits: launch-time pruning on CUDA, e.g. a register budget that depends on a launch argument; it
            must accept at least one candidate for every launch. None keeps every candidate.

    Raises:
        ValueError: no candidates; tiles that tune different meta-parameters; a dot side below 16.
    """

    candidates: tuple[Tile, ...]
    interpreter: Tile
    dot_sides: tuple[str, ...]
    fits: Fits | None = None

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("a tuning space needs at least one candidate tile.")
        names = set(self.interpreter.blocks)
        for tile in (*self.candidates, self.interpreter):
            if set(tile.blocks) != names:
                raise ValueError(
                    f"every tile must tune the same meta-parameters {sorted(names)}, "
                    f"got {sorted(tile.blocks)}."
                )
            for side in self.dot_sides:
                if tile.blocks.get(side, MIN_DOT_SIDE) < MIN_DOT_SIDE:
                    raise ValueError(
                        f"{side}={tile.blocks[side]} is a side of a tl.dot operand, which needs >= "
                        f"{MIN_DOT_SIDE}; raise it to {MIN_DOT_SIDE}."
                    )
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError("the candidate tiles repeat one another; list each once.")


def tuning_configs(space: TuningSpace, *, interpreted: bool) -> list[Any]:
    """The ``triton.Config`` list of a kernel: every candidate on CUDA, the one interpreter tile otherwise.

    Args:
        space: the kernel's candidates and interpreter tile.
        interpreted: whether the kernel runs in Triton's interpreter.

    Returns:
        A non-empty list of ``triton.Config``; exactly one when ``interpreted``.
    """
    tiles = (space.interpreter,) if interpreted else space.candidates
    return [tile.config() for tile in tiles]


def _pruner(fits: Fits) -> Callable[..., list[Any]]:
    """``fits`` as triton's ``early_config_prune(configs, named_args, **launch_kwargs)``."""

    def prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
        launch = {**named_args, **kwargs}
        kept = [config for config in configs if fits({**launch, **config.kwargs})]
        if not kept:
            raise ValueError(
                "no autotune candidate fits this launch; the kernel's tuning space must keep at least one "
                "(its smallest tile) for every problem size."
            )
        return kept

    return prune


class TunedKernel:
    """A ``triton.jit`` kernel wrapped in ``triton.autotune``, launched one thread at a time.

    Args:
        kernel: the ``triton.jit`` function (compiled or interpreted, as triton was imported).
        space: its launch configurations.
        key: the launch arguments whose values select a tuning (see the module docstring).
    """

    def __init__(self, kernel: Any, space: TuningSpace, key: Sequence[str]) -> None:
        self.kernel = kernel
        self.space = space
        self.interpreted = not isinstance(kernel, triton.runtime.JITFunction)
        prune = (
            None if self.interpreted or space.fits is None else {"early_config_prune": _pruner(space.fits)}
        )
        self.autotuner = triton.autotune(
            configs=tuning_configs(space, interpreted=self.interpreted),
            key=list(key),
            prune_configs_by=prune,
            cache_results=not self.interpreted,
        )(kernel)
        self._lock = threading.Lock()

    @property
    def configs(self) -> list[Any]:
        """The ``triton.Config`` list the autotuner chooses from."""
        return self.autotuner.configs

    def launch(self, grid: Callable[[dict[str, Any]], tuple[int, ...]], *args: Any, **kwargs: Any) -> None:
        """Launch with the best config for this key (timing the candidates first if the key is new).

        Args:
            grid: the number of programs, from the chosen config's meta-parameters.
            *args: the kernel's runtime arguments, in order.
            **kwargs: its untuned meta-parameters; never a tuned one.
        """
        with self._lock:
            self.autotuner[grid](*args, **kwargs)


def autotuned(kernel: Any, space: TuningSpace, key: Sequence[str]) -> TunedKernel:
    """``kernel`` ready to launch with its best tile: see ``TunedKernel``."""
    return TunedKernel(kernel, space, key)


def size_bucket(n: int, *, low: int, high: int) -> int:
    """``n`` rounded up to a power of two and clamped to [low, high]: an autotune key for a size that varies.

    Args:
        n: a size that changes from launch to launch (rows of a batch, tokens).
        low: the smallest bucket, a power of two (sizes below it share one tuning).
        high: the largest bucket, a power of two (sizes above it share one tuning).
    """
    if not (_is_power_of_two(low) and _is_power_of_two(high) and low <= high):
        raise ValueError(f"low={low} and high={high} must be powers of two with low <= high.")
    return min(high, max(low, 1 << (max(n, 1) - 1).bit_length()))
