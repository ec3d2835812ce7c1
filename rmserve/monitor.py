"""The run monitor: per training run and model, a time series of what its rewards look like.

A request names its run (``x-rmserve-run`` header, ``run`` query parameter, or a body's ``run`` field); the
scored inputs of a run and model fill windows of ``window`` inputs each. A closed window records:

- ``reward_mean``, ``reward_std`` (population) and the quantiles ``QUANTILES`` of the rewards;
- ``disagreement``: the mean over inputs of the standard deviation (population) of the model's heads
  (ensembles, multi-head, BRME; absent for one head);
- ``sigma_mean``: the mean BRME sigma over inputs and heads (brme models only);
- ``length_mean``: the mean input length in tokens (prompt and response: within a run the prompts come
  from one distribution, so this moves with the responses);
- ``length_spearman``: Spearman's rank correlation of reward with input length (ties get their mean
  rank; absent when either is constant);
- ``saturation``: the share of rewards above the reference 99th percentile: the model's
  ``reference_p99`` when the configuration gives one, else the 99th percentile of the run's baseline
  windows' rewards (about 1% there by construction);
- ``drift``: each signal minus its mean over the run's first ``baseline_windows`` windows (from the
  window that completes the baseline on).

Memory is bounded: at most ``max_runs`` runs (the least recently used is dropped first, its metrics with
it), per run and model at most ``max_windows`` closed windows (the oldest dropped; the baseline is kept
apart) and one open window's values. These are monitoring and audit signals: they describe the rewards a
run received; none of them is a guarantee of early warning of reward hacking.

``RunningNorm`` is the opt-in per-run normalisation (``"normalize": "run"``): Welford's running mean and
variance of a run's rewards for one model.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

RUN_NAME = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")
RUN_HELP = "1 to 128 letters, digits and ._:/@+-"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
SIGNALS = (
    "reward_mean", "reward_std", "disagreement", "sigma_mean", "length_mean", "length_spearman", "saturation",
)  # fmt: skip


def check_run(name: str) -> str:
    """A run name as given, or ValueError saying what a run name may hold."""
    if not RUN_NAME.fullmatch(name):
        raise ValueError(f"run {name[:140]!r} must be {RUN_HELP} (a training run's name).")
    return name


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); None when either side is constant or
    there are fewer than two points."""
    if len(x) < 2:
        return None
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


@dataclass(frozen=True)
class Scored:
    """What the monitor is told of one scored input."""

    reward: float
    tokens: int
    heads: Sequence[float] = ()
    sigmas: Sequence[float] | None = None


@dataclass(slots=True)
class Window:
    """One closed window of a run and model."""

    index: int
    start: float
    end: float
    count: int
    reward_mean: float
    reward_std: float
    quantiles: dict[str, float]
    disagreement: float | None
    sigma_mean: float | None
    length_mean: float
    length_spearman: float | None
    saturation: float | None = None
    drift: dict[str, float | None] = field(default_factory=dict)

    def signal(self, name: str) -> float | None:
        value = getattr(self, name)
        return None if value is None else float(value)


def summarise(index: int, start: float, end: float, items: Sequence[Scored]) -> Window:
    """The statistics of one window's inputs (saturation and drift are filled by the series)."""
    rewards = np.array([s.reward for s in items], dtype=np.float64)  # (n,)
    tokens = [float(s.tokens) for s in items]
    spread = [float(np.std(s.heads)) for s in items if len(s.heads) > 1]
    sigmas = [float(np.mean(s.sigmas)) for s in items if s.sigmas]
    return Window(
        index=index,
        start=start,
        end=end,
        count=len(items),
        reward_mean=float(rewards.mean()),
        reward_std=float(rewards.std()),
        quantiles={f"p{round(q * 100):02d}": float(np.quantile(rewards, q)) for q in QUANTILES},
        disagreement=float(np.mean(spread)) if len(spread) == len(items) else None,
        sigma_mean=float(np.mean(sigmas)) if len(sigmas) == len(items) else None,
        length_mean=float(np.mean(tokens)),
        length_spearman=spearman(rewards.tolist(), tokens),
    )


class Series:
    """One run's windows for one model."""

    def __init__(
        self, window: int, max_windows: int, baseline_windows: int, reference_p99: float | None
    ) -> None:
        self.window = window
        self.max_windows = max_windows
        self.baseline_windows = baseline_windows
        self.reference_p99 = reference_p99
        self.open: list[Scored] = []
        self.open_since = 0.0
        self.closed: list[Window] = []
        self.baseline: list[Window] = []
        self.baseline_rewards: list[float] = []  # the baseline windows' rewards, for the p99 (bounded)
        self.p99: float | None = reference_p99
        self.inputs = 0
        self.next_index = 0

    def add(self, items: Sequence[Scored], now: float) -> list[Window]:
        """Add scored inputs; returns the windows they closed."""
        closed = []
        for item in items:
            if not self.open:
                self.open_since = now
            self.open.append(item)
            self.inputs += 1
            if len(self.open) == self.window:
                closed.append(self._close(now))
        return closed

    def _close(self, now: float) -> Window:
        items, self.open = self.open, []
        window = summarise(self.next_index, self.open_since, now, items)
        self.next_index += 1
        rewards = np.array([s.reward for s in items])  # (n,)
        if self.p99 is not None:
            window.saturation = float(np.mean(rewards > self.p99))
        if len(self.baseline) < self.baseline_windows:
            self.baseline.append(window)
            if self.reference_p99 is None:
                self.baseline_rewards.extend(rewards.tolist())
                if len(self.baseline) == self.baseline_windows:  # the baseline's p99, and its own saturation
                    pooled = np.array(self.baseline_rewards)  # (baseline_windows * window,)
                    self.p99 = float(np.quantile(pooled, 0.99))
                    for i, earlier in enumerate(self.baseline):
                        share = pooled[i * self.window : (i + 1) * self.window] > self.p99
                        earlier.saturation = float(np.mean(share))
                    self.baseline_rewards = []
        if len(self.baseline) == self.baseline_windows:
            window.drift = self._drift(window)
        self.closed.append(window)
        if len(self.closed) > self.max_windows:
            del self.closed[0]
        return window

    def _drift(self, window: Window) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name in SIGNALS:
            base = [w.signal(name) for w in self.baseline]
            value = window.signal(name)
            known = [b for b in base if b is not None]
            out[name] = None if value is None or len(known) != len(base) else value - float(np.mean(known))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "window": self.window,
            "reference_p99": self.p99,
            "reference": "model" if self.reference_p99 is not None else "baseline",
            "baseline_windows": [w.index for w in self.baseline],
            "windows": [asdict(w) for w in self.closed],
            "open": {"count": len(self.open), "since": self.open_since if self.open else None},
        }


class RunningNorm:
    """Welford's running mean and variance (population) of one run's rewards for one model."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: Sequence[float]) -> None:
        for value in values:
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (value - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def normalise(self, values: Sequence[float], eps: float = 1e-8) -> list[float]:
        """``(v - mean) / std`` under the statistics so far (0 while the std is 0)."""
        std = self.std
        return [(v - self.mean) / std if std > eps else 0.0 for v in values]


@dataclass
class Run:
    """One run: a series and a normaliser per model, and when it was last seen."""

    name: str
    created: float
    last_seen: float
    series: dict[str, Series] = field(default_factory=dict)
    norms: dict[str, RunningNorm] = field(default_factory=dict)


WindowListener = Callable[[str, str, Window], None]
Evicted = Callable[[str, Sequence[str]], None]


class RunMonitor:
    """Every run's series, bounded (module docstring); thread-safe.

    Args:
        window: inputs per window.
        max_runs: runs kept (0: the monitor is off and records nothing).
        max_windows: closed windows kept per run and model.
        baseline_windows: the first windows of a run and model that drift is measured from.
        reference_p99: per model, a reference 99th percentile of its rewards (else the run's baseline).
        on_window: called with (run, model, window) for each closed window (the metrics).
        on_evict: called with (run, models) when a run is dropped.
        clock: seconds (``time.time``).
    """

    def __init__(
        self,
        *,
        window: int = 256,
        max_runs: int = 64,
        max_windows: int = 512,
        baseline_windows: int = 3,
        reference_p99: dict[str, float] | None = None,
        on_window: WindowListener | None = None,
        on_evict: Evicted | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window < 1 or max_runs < 0 or max_windows < 1 or baseline_windows < 1:
            raise ValueError(
                "window, max_windows and baseline_windows must be at least 1, max_runs at least 0."
            )
        self.window = window
        self.max_runs = max_runs
        self.max_windows = max_windows
        self.baseline_windows = baseline_windows
        self.reference_p99 = dict(reference_p99 or {})
        self._on_window = on_window
        self._on_evict = on_evict
        self._clock = clock
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_runs > 0

    def _run(self, name: str, now: float) -> Run:
        run = self._runs.get(name)
        if run is None:
            run = Run(name, now, now)
            self._runs[name] = run
            while len(self._runs) > self.max_runs:
                _, dropped = self._runs.popitem(last=False)
                if self._on_evict is not None:
                    self._on_evict(dropped.name, list(dropped.series))
        run.last_seen = now
        self._runs.move_to_end(name)
        return run

    def record(self, run: str, model: str, items: Sequence[Scored]) -> None:
        """Add one request's scored inputs to the run's series for ``model``."""
        if not self.enabled or not items:
            return
        with self._lock:
            now = self._clock()
            record = self._run(run, now)
            series = record.series.get(model)
            if series is None:
                series = Series(
                    self.window, self.max_windows, self.baseline_windows, self.reference_p99.get(model)
                )
                record.series[model] = series
            closed = series.add(items, now)
        if self._on_window is not None:
            for window in closed:
                self._on_window(run, model, window)

    def normalise(self, run: str, model: str, rewards: Sequence[float]) -> list[float]:
        """Update the run's running statistics for ``model`` with ``rewards``, then normalise them."""
        with self._lock:
            record = self._run(run, self._clock())
            norm = record.norms.setdefault(model, RunningNorm())
            norm.update(rewards)
            return norm.normalise(rewards)

    def runs(self) -> list[dict[str, Any]]:
        """A line per run, most recently seen first."""
        with self._lock:
            return [
                {
                    "id": run.name,
                    "created": run.created,
                    "last_seen": run.last_seen,
                    "models": {
                        m: {"inputs": s.inputs, "windows": s.next_index} for m, s in run.series.items()
                    },
                }
                for run in reversed(self._runs.values())
            ]

    def series(self, name: str) -> dict[str, Any] | None:
        """One run's series per model (None: no such run)."""
        with self._lock:
            run = self._runs.get(name)
            if run is None:
                return None
            return {
                "id": run.name,
                "created": run.created,
                "last_seen": run.last_seen,
                "models": {model: s.as_dict() for model, s in run.series.items()},
                "normalization": {
                    m: {"count": n.count, "mean": n.mean, "std": n.std} for m, n in run.norms.items()
                },
            }
