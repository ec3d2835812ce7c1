"""The lab's scoring against fake servers (httpx.MockTransport): a /v1/score-only server works, and a
server that answers badly gets a clear LabError, never a traceback or a silent gap."""

from __future__ import annotations

import json

import httpx
import pytest

from rmserve.lab.candidates import Candidates, chunk_name, write_chunk
from rmserve.lab.scoring import LabError, read_scores, score_all, score_file
from rmserve.lab.targets import parse_target


def fake_server(score: dict | None, *, status: int = 200, models: int = 404):
    """Answer GET /v1/models with ``models`` (404: a server without it) and POST /v1/score with ``score``."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(models, json={"error": {"message": "no such route"}})
        body = json.loads(request.content)
        n = len(body["inputs"])
        if status != 200:
            return httpx.Response(status, json={"error": {"type": "invalid_request", "message": "bad input"}})
        answer = {
            "model": "m",
            "reward": "mean",
            "rewards": [float(i) for i in range(n)],
            "truncated": [False] * n,
        }
        answer |= {"usage": {"input_tokens": 10 * n}, **(score or {})}
        return httpx.Response(200, json=answer)

    return httpx.MockTransport(handler)


@pytest.fixture
def candidates(tmp_path):
    folder = tmp_path / "candidates"
    folder.mkdir()
    write_chunk(folder / chunk_name(0), [Candidates(f"p{i}", "q", ["a", "b", "c"]) for i in range(4)])
    return folder


def test_a_score_only_server_is_scored_and_resumed(candidates, tmp_path):
    target = parse_target("x=http://fake:1")
    stats = score_all(
        [target], candidates, tmp_path / "scores", transport=fake_server(None), echo=lambda _: None
    )
    assert (stats[0].prompts, stats[0].inputs, stats[0].input_tokens) == (4, 12, 120)
    assert read_scores(score_file(tmp_path / "scores", target), target) == {
        f"p{i}": [0.0, 1.0, 2.0] for i in range(4)
    }
    again = score_all(
        [target], candidates, tmp_path / "scores", transport=fake_server(None), echo=lambda _: None
    )
    assert again == []  # nothing left to score
    down = httpx.MockTransport(lambda request: httpx.Response(503))
    assert score_all([target], candidates, tmp_path / "scores", transport=down, echo=lambda _: None) == []


@pytest.mark.parametrize(
    ("target", "server", "message"),
    [
        ("http://fake:1", fake_server({"rewards": [0.0]}), "returned 1 rewards for 3 inputs"),
        ("http://fake:1::min", fake_server(None), "without 3 scores"),
        ("http://fake:1", fake_server(None, status=422), "refused a request"),
    ],
)
def test_a_server_that_answers_badly_gets_a_clear_error(candidates, tmp_path, target, server, message):
    with pytest.raises(LabError, match=message):
        score_all(
            [parse_target(target)], candidates, tmp_path / "scores", transport=server, echo=lambda _: None
        )
