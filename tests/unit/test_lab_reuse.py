"""``rmserve lab bon --reuse``: a previous report's scores of the same targets are copied, only the new
targets' servers are asked, and candidates other than the report's are refused."""

from __future__ import annotations

import json

import httpx
import pytest

from rmserve.lab.candidates import Candidates, chunk_name, write_chunk
from rmserve.lab.reuse import reused, seed_caches
from rmserve.lab.scoring import collect_scores, read_throughput, score_all
from rmserve.lab.targets import parse_target


def counting_server(asked: list[str]):
    """Every model's reward of candidate i is i + len(model name); ``asked`` records the models scored."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(404, json={"error": {"message": "no such route"}})
        body = json.loads(request.content)
        asked.append(body["model"])
        n = len(body["inputs"])
        rewards = [float(i + len(body["model"])) for i in range(n)]
        answer = {"model": body["model"], "reward": "mean", "rewards": rewards, "truncated": [False] * n}
        return httpx.Response(200, json=answer | {"usage": {"input_tokens": 10 * n}})

    return httpx.MockTransport(handler)


def write_candidates(folder, responses=("a", "bb", "ccc"), prompts=4):
    folder.mkdir()
    records = [Candidates(f"p{i}", "q", list(responses), [1, 2, 3]) for i in range(prompts)]
    write_chunk(folder / chunk_name(0), records)
    return folder


@pytest.fixture
def report(tmp_path):
    """A previous report over 4 prompts: gold and proxy ``a``, scored at http://old:1."""
    candidates = write_candidates(tmp_path / "candidates")
    targets = [parse_target("gold=http://old:1:g"), parse_target("a=http://old:1:a")]
    scores = tmp_path / "old" / "scores"
    score_all(targets, candidates, scores, transport=counting_server([]), echo=lambda _: None)
    previous = {
        "targets": {t.label: t.spec for t in targets},
        "throughput": read_throughput(scores),
    }
    return candidates, collect_scores(targets, candidates, scores), previous


def test_the_reports_targets_are_copied_and_only_new_ones_are_scored(report, tmp_path):
    candidates, records, previous = report
    targets = [
        parse_target("gold=http://new:2:g"),  # moved server, same model: copied
        parse_target("a=http://new:2:a"),
        parse_target("b=http://new:2:b"),  # new: scored
    ]
    scores = tmp_path / "new" / "scores"
    said: list[str] = []
    copied = seed_caches(records, previous, targets, candidates, scores, "old", said.append)
    assert copied == ["gold", "a"]
    assert reused(scores) == {"gold": "old", "a": "old"}
    asked: list[str] = []
    score_all(targets, candidates, scores, transport=counting_server(asked), echo=said.append)
    assert asked == ["b"] * 4
    new = collect_scores(targets, candidates, scores)
    assert [r["scores"]["gold"] for r in new] == [r["scores"]["gold"] for r in records]
    assert new[0]["scores"] == {"gold": [1.0, 2.0, 3.0], "a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, 3.0]}
    throughput = {tuple(g["labels"]): g for g in read_throughput(scores)}
    assert set(throughput) == {("gold",), ("a",), ("b",)}
    assert throughput[("gold",)]["inputs"] == previous["throughput"][0]["inputs"] == 12
    # a second run (resumed) copies nothing again and adds no throughput twice
    assert seed_caches(records, previous, targets, candidates, scores, "old", said.append) == []
    assert len(read_throughput(scores)) == 3


def test_a_target_scored_otherwise_is_scored_anew(report, tmp_path):
    candidates, records, previous = report
    targets = [parse_target("gold=http://new:2:g"), parse_target("a=http://new:2:a:min")]
    said: list[str] = []
    copied = seed_caches(records, previous, targets, candidates, tmp_path / "s", "old", said.append)
    assert copied == ["gold"]
    assert any("a: old scored 'http://old:1:a', not 'http://new:2:a:min'" in line for line in said)


@pytest.mark.parametrize(
    ("responses", "prompts", "message"),
    [
        (("a", "bb", "cccc"), 4, "prompt p0: its candidates differ"),
        (("a", "bb", "ccc"), 3, "scored 4 prompts, the candidates hold 3"),
        (("a", "bb", "ccc"), 5, "has no prompt p4"),
    ],
)
def test_other_candidates_are_refused(report, tmp_path, responses, prompts, message):
    _, records, previous = report
    other = write_candidates(tmp_path / "other", responses, prompts)
    with pytest.raises(ValueError, match=message):
        seed_caches(records, previous, [parse_target("gold=http://new:2:g")], other, tmp_path / "s", "old")
