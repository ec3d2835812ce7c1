"""The run monitor through the API: naming runs, the series routes, per-run normalisation and metrics."""

from __future__ import annotations

import math

import pytest

from tests.api.app_client import serve

pytestmark = pytest.mark.anyio
TEXTS = [{"text": f"<|im_start|>user\nq{i}<|im_end|>\n<|im_start|>assistant\n{'a' * (i + 1)}<|im_end|>"} for i in range(6)]  # fmt: skip


async def test_a_run_named_three_ways_gets_a_series_per_model(llama, brme):
    async with serve([llama, brme], monitor_window=2) as client:
        body = await client.post("/v1/score", json={"inputs": TEXTS[:2], "run": "ppo-1", "return_heads": True, "model": "tiny-brme"})  # fmt: skip
        header = await client.post("/v1/score", json={"inputs": TEXTS[2:4], "model": "tiny-brme"}, headers={"x-rmserve-run": "ppo-1"})  # fmt: skip
        query = await client.post("/get_reward?run=ppo-1", json={"query": [t["text"] for t in TEXTS[:3]]})
        listing = (await client.get("/v1/runs")).json()
        detail = (await client.get("/v1/runs/ppo-1")).json()
    assert body.status_code == header.status_code == query.status_code == 200
    assert listing["window"] == 2 and listing["max_runs"] == 64
    (line,) = listing["data"]
    assert line["id"] == "ppo-1"
    assert line["models"] == {
        "tiny-brme": {"inputs": 4, "windows": 2},
        "tiny-llama": {"inputs": 3, "windows": 1},
    }
    w0 = detail["models"]["tiny-brme"]["windows"][0]
    rewards = body.json()["rewards"]
    assert w0["reward_mean"] == pytest.approx(sum(rewards) / 2, abs=1e-6)
    heads, sigmas = body.json()["heads"], body.json()["head_std"]
    spread = [math.sqrt(sum((h - sum(row) / len(row)) ** 2 for h in row) / len(row)) for row in heads]
    assert w0["disagreement"] == pytest.approx(sum(spread) / 2, rel=1e-5)
    assert w0["sigma_mean"] == pytest.approx(sum(sum(r) / len(r) for r in sigmas) / 2, rel=1e-5)
    assert detail["models"]["tiny-llama"]["open"]["count"] == 1
    assert detail["models"]["tiny-llama"]["windows"][0]["disagreement"] is None  # one head


async def test_per_run_normalisation_is_welford_over_the_runs_rewards(llama):
    async with serve([llama]) as client:
        raw = [(await client.post("/v1/score", json={"inputs": [t]})).json()["rewards"][0] for t in TEXTS[:3]]
        first = (
            await client.post("/v1/score", json={"inputs": TEXTS[:2], "run": "r", "normalize": "run"})
        ).json()
        second = (
            await client.post("/get_reward?run=r&normalize=run", json={"query": [TEXTS[2]["text"]]})
        ).json()
        plain = (await client.post("/v1/score", json={"inputs": TEXTS[:1], "run": "r"})).json()
        refused = await client.post("/v1/score", json={"inputs": TEXTS[:1], "normalize": "run"})
        bad = await client.post("/v1/score", json={"inputs": TEXTS[:1]}, headers={"x-rmserve-run": "a b"})
        other = await client.post("/get_reward?run=r&normalize=z", json={"query": ["x"]})
    mean2, std2 = sum(raw[:2]) / 2, abs(raw[0] - raw[1]) / 2
    assert first["rewards"] == pytest.approx([(r - mean2) / std2 for r in raw[:2]], rel=1e-4)
    mean3 = sum(raw) / 3
    std3 = math.sqrt(sum((r - mean3) ** 2 for r in raw) / 3)
    assert second["rewards"] == pytest.approx([(raw[2] - mean3) / std3], rel=1e-4)
    assert plain["rewards"] == pytest.approx(raw[:1], abs=1e-5)  # normalisation is opt-in per request
    assert refused.status_code == 422 and "normalize 'run' needs a run" in refused.json()["error"]["message"]
    assert bad.status_code == 422 and "must be 1 to 128 letters" in bad.json()["error"]["message"]
    assert other.status_code == 422 and "the one normalisation is 'run'" in other.json()["error"]["message"]


async def test_run_gauges_follow_the_last_window_and_leave_with_the_run(llama):
    async with serve([llama], monitor_window=1, monitor_max_runs=1) as client:
        await client.post("/v1/score", json={"inputs": TEXTS[:1], "run": "old"})
        before = (await client.get("/metrics")).text
        await client.post("/v1/score", json={"inputs": TEXTS[:1], "run": "new"})
        after = (await client.get("/metrics")).text
        gone = await client.get("/v1/runs/old")
    assert 'rmserve_run_signal{model="tiny-llama",run="old",signal="reward_mean"}' in before
    assert (
        'run="old"' not in after
        and 'rmserve_run_signal{model="tiny-llama",run="new",signal="reward_mean"}' in after
    )
    assert gone.status_code == 404 and "recent runs: new" in gone.json()["error"]["message"]
