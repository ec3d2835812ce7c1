"""The lab's best-of-n estimator, its targets and its candidates files, with exact answers."""

from __future__ import annotations

import gzip
import itertools
import json
import math

import numpy as np
import pytest

from rmserve.lab.bon import bon_curves, kl_bon, n_grid, pick_weights
from rmserve.lab.candidates import Candidates, chunk_name, read_candidates, write_chunk
from rmserve.lab.targets import check_labels, parse_target


def brute_force(scores: np.ndarray, n: int) -> np.ndarray:
    """Each candidate's chance of being the pick, over every n-subset, ties broken uniformly."""
    chance = np.zeros(len(scores))
    subsets = list(itertools.combinations(range(len(scores)), n))
    for subset in subsets:
        top = max(scores[list(subset)])
        tied = [i for i in subset if scores[i] == top]
        for i in tied:
            chance[i] += 1 / len(tied) / len(subsets)
    return chance


@pytest.mark.parametrize("scores", [[0.3, 0.1, 0.3, 0.9, 0.5, 0.5, -1.0, 0.3], list(range(8)), [1.0] * 8])
def test_pick_weights_are_the_chance_of_being_the_pick_over_every_subset(scores):
    s = np.array(scores, dtype=float)
    for n in range(1, len(s) + 1):
        np.testing.assert_allclose(pick_weights(s, n), brute_force(s, n), atol=1e-12)


def test_kl_and_the_n_grid():
    assert kl_bon(1) == 0.0
    assert kl_bon(64) == pytest.approx(math.log(64) - 63 / 64)
    assert n_grid(64) == [1, 2, 4, 8, 16, 32, 64]
    assert n_grid(48) == [1, 2, 4, 8, 16, 32, 48]
    with pytest.raises(ValueError, match="n must lie"):
        pick_weights(np.zeros(4), 5)


def test_curves_start_at_the_mean_and_the_oracle_reaches_the_best():
    rng = np.random.default_rng(0)
    gold = rng.normal(size=(30, 16))
    proxy = gold + rng.normal(size=(30, 16))
    scores = [{"gold": g.tolist(), "p": p.tolist()} for g, p in zip(gold, proxy, strict=True)]
    lengths = [list(range(16))] * 30
    p_curve, oracle = bon_curves(scores, lengths, ["p", "gold"], "gold", bootstrap=200)
    assert p_curve.ns == [1, 2, 4, 8, 16]
    assert p_curve.gold[0].mean == pytest.approx(gold.mean())
    assert oracle.gold[-1].mean == pytest.approx(gold.max(axis=1).mean())
    assert p_curve.gold[-1].mean == pytest.approx(gold[np.arange(30), proxy.argmax(axis=1)].mean())
    assert p_curve.gold[-1].low <= p_curve.gold[-1].mean <= p_curve.gold[-1].high
    assert [pt.mean for pt in oracle.gold] == sorted(pt.mean for pt in oracle.gold)
    assert p_curve.length[0].mean == pytest.approx(7.5)
    with pytest.raises(ValueError, match="same number of candidates"):
        bon_curves([*scores, {"gold": [0.0], "p": [0.0]}], [*lengths, [1]], ["p"], "gold")


def test_targets_parse_labels_models_aggregates_and_options():
    t = parse_target("http://127.0.0.1:8000")
    assert (t.url, t.model, t.aggregate, t.options, t.label) == (
        "http://127.0.0.1:8000",
        None,
        None,
        (),
        "default",
    )
    t = parse_target("b=http://h:8001:brme:tradeoff?tradeoff_scope=request&tradeoff_lambda=0.4")
    assert (t.label, t.url, t.model, t.aggregate) == ("b", "http://h:8001", "brme", "tradeoff")
    assert t.options == (("tradeoff_lambda", 0.4), ("tradeoff_scope", "request"))
    assert t.spec == "http://h:8001:brme:tradeoff?tradeoff_lambda=0.4&tradeoff_scope=request"
    # a cache follows the reward, not the address: a restarted or moved server still resumes
    assert parse_target("a=http://h:1:m:min").fingerprint == parse_target("b=https://g:2:m:min").fingerprint
    assert parse_target("http://h:1:m:min").fingerprint != parse_target("http://h:1:m:mean").fingerprint
    assert parse_target("https://rm.example.com::min").model is None
    assert parse_target("https://rm.example.com::min").label == "default-min"
    for bad, message in (
        ("127.0.0.1:8000", "starting http"),
        ("http://h:8000:a:b:c", "expected"),
        ("http://h:8000:a?alpha=1", "unknown option 'alpha'"),
        ("http://h:8000:a?uwo_lambda=x", "must be a number"),
        ("bad label=http://h", "a label is"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_target(bad)
    with pytest.raises(ValueError, match="two targets are labelled"):
        check_labels([parse_target("x=http://h:1"), parse_target("x=http://h:2")])


def test_candidates_round_trip_and_refuse_bad_lines(tmp_path):
    records = [Candidates("a", "p", ["r1", "r2"], [3, 4], [True, False]), Candidates("b", "q", ["s"])]
    write_chunk(tmp_path / chunk_name(0), records)
    assert read_candidates(tmp_path) == records
    bad = tmp_path / "bad.jsonl.gz"
    for line, message in (
        ({"id": "a", "prompt": "p", "responses": []}, "non-empty list"),
        ({"id": "a", "prompt": "p", "responses": ["x"], "finished": [1]}, "one bool per response"),
        ({"id": 1, "prompt": "p", "responses": ["x"]}, "must be strings"),
    ):
        with gzip.open(bad, "wt") as f:
            f.write(json.dumps(line) + "\n")
        with pytest.raises(ValueError, match=message):
            read_candidates(bad)
    with pytest.raises(FileNotFoundError, match="rmserve lab generate"):
        read_candidates(tmp_path / "missing")
