"""The run monitor against hand computations on known rewards and lengths, its bounds, and Welford."""

from __future__ import annotations

import math

import pytest

from rmserve.monitor import RunMonitor, RunningNorm, Scored, check_run, spearman


def monitor(**kwargs) -> tuple[RunMonitor, list[tuple[str, str, int]]]:
    closed: list[tuple[str, str, int]] = []
    clock = iter(range(1000, 100000))
    m = RunMonitor(on_window=lambda run, model, w: closed.append((run, model, w.index)), clock=lambda: next(clock), **kwargs)  # fmt: skip
    return m, closed


def test_windows_match_a_hand_computation():
    m, closed = monitor(window=4, baseline_windows=1)
    first = [
        Scored(1.0, 10, (1.0, 1.0), (0.5, 0.5)),
        Scored(2.0, 20, (1.0, 3.0), (0.5, 1.5)),
        Scored(3.0, 30, (2.0, 4.0), (1.0, 1.0)),
    ]
    m.record("ppo", "rm", first)
    assert closed == [] and m.series("ppo")["models"]["rm"]["open"]["count"] == 3
    m.record("ppo", "rm", [Scored(4.0, 40, (4.0, 4.0), (0.0, 2.0)), Scored(5.0, 10, (5.0, 5.0), (1.0, 1.0))])
    m.record("ppo", "rm", [Scored(0.0, t, (0.0, 0.0), (1.0, 1.0)) for t in (20, 30, 40)])
    series = m.series("ppo")["models"]["rm"]
    w0, w1 = series["windows"]
    assert closed == [("ppo", "rm", 0), ("ppo", "rm", 1)]
    # window 0: rewards 1, 2, 3, 4; lengths 10..40; head spreads 0, 1, 1, 0; sigmas' means 0.5, 1, 1, 1
    assert w0["count"] == 4 and w0["reward_mean"] == 2.5
    assert w0["reward_std"] == pytest.approx(math.sqrt(1.25))
    assert w0["quantiles"] == pytest.approx({"p05": 1.15, "p25": 1.75, "p50": 2.5, "p75": 3.25, "p95": 3.85})
    assert w0["disagreement"] == pytest.approx(0.5)
    assert w0["sigma_mean"] == pytest.approx(0.875)
    assert w0["length_mean"] == 25.0 and w0["length_spearman"] == pytest.approx(1.0)
    # the baseline is window 0: its p99 is 3.97, so one reward in four (4.0) lies above it
    assert series["reference_p99"] == pytest.approx(3.97) and series["reference"] == "baseline"
    assert w0["saturation"] == 0.25
    # window 1: rewards 5, 0, 0, 0 against lengths 10, 20, 30, 40: ranks (4, 2, 2, 2) and (1, 2, 3, 4)
    assert w1["reward_mean"] == 1.25 and w1["saturation"] == 0.25
    assert w1["length_spearman"] == pytest.approx(-3 / math.sqrt(15))
    assert w1["disagreement"] == 0.0
    assert w1["drift"]["reward_mean"] == pytest.approx(1.25 - 2.5)
    assert w1["drift"]["length_spearman"] == pytest.approx(-3 / math.sqrt(15) - 1.0)
    assert w1["drift"]["disagreement"] == pytest.approx(-0.5)


def test_a_models_reference_p99_sets_saturation_from_the_first_window():
    m, _ = monitor(window=2, baseline_windows=2, reference_p99={"rm": 1.5})
    m.record("r", "rm", [Scored(1.0, 5), Scored(2.0, 5), Scored(3.0, 5), Scored(0.0, 5)])
    series = m.series("r")["models"]["rm"]
    assert [w["saturation"] for w in series["windows"]] == [0.5, 0.5]
    assert series["reference"] == "model" and series["reference_p99"] == 1.5
    assert series["windows"][0]["disagreement"] is None  # one head: no disagreement
    assert series["windows"][0]["drift"] == {}  # the baseline is not complete yet at window 0


def test_runs_and_windows_stay_bounded_with_10000_run_ids():
    # bench/monitor_memory.py measures the memory this bounds (docs/benchmarks.md)
    m, _ = monitor(window=2, max_runs=8, max_windows=3)
    for i in range(10_000):
        m.record(f"run-{i}", "rm", [Scored(float(i), 3)])
    for _ in range(50):
        m.record("long", "rm", [Scored(1.0, 3), Scored(2.0, 4)])
    lines = m.runs()
    assert len(lines) == 8 and lines[0]["id"] == "long" and lines[1]["id"] == "run-9999"
    series = m.series("long")["models"]["rm"]
    assert len(series["windows"]) == 3 and series["windows"][-1]["index"] == 49
    assert series["inputs"] == 100
    assert m.series("run-0") is None


def test_evicted_runs_are_reported_and_an_off_monitor_records_nothing():
    evicted: list[tuple[str, list[str]]] = []
    m = RunMonitor(window=1, max_runs=1, on_evict=lambda run, models: evicted.append((run, list(models))))
    m.record("a", "rm", [Scored(1.0, 1)])
    m.record("b", "rm", [Scored(1.0, 1)])
    assert evicted == [("a", ["rm"])]
    off = RunMonitor(max_runs=0)
    off.record("a", "rm", [Scored(1.0, 1)])
    assert off.runs() == [] and not off.enabled


def test_welford_normalisation_matches_the_batch_statistics():
    norm = RunningNorm()
    values = [0.5, 2.0, -1.0, 3.5, 0.0]
    norm.update(values[:2])
    norm.update(values[2:])
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    assert (norm.count, norm.mean, norm.std) == (5, pytest.approx(mean), pytest.approx(std))
    assert norm.normalise([mean + std]) == [pytest.approx(1.0)]
    m = RunMonitor()
    assert m.normalise("r", "rm", [3.0]) == [0.0]  # one reward: std 0, so 0
    assert m.normalise("r", "rm", [1.0]) == [pytest.approx(-1.0)]  # mean 2, std 1


def test_spearman_and_run_names():
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1.0], [2.0]) is None
    assert check_run("ppo-7b/seed:1") == "ppo-7b/seed:1"
    with pytest.raises(ValueError, match="must be 1 to 128 letters"):
        check_run("a b")
