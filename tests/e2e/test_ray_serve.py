"""rmserve on a local Ray cluster (Ray Serve): two CPU replicas of a tiny model behind Serve's proxy.

Every route answers through the proxy as a single server does; under load, a replica removed by Serve
(scaled down: drained) loses nothing and scores nothing twice, and a replica killed outright loses no call
once the client library retries.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from rmserve.deploy.ray import build
from rmserve.launch import free_port
from rmserve_client import AsyncRewardClient
from tests.scoring_load import PAIRS, expected_rewards, keep_scoring

APP = "rmserve"


def args_for(model_dir: Path, replicas: int) -> dict:
    settings = {"model": str(model_dir), "dtype": "float32", "log_format": "json", "max_wait_ms": 2}
    return {"settings": settings, "min_replicas": replicas, "max_replicas": replicas, "num_cpus": 0.5}


@pytest.fixture(scope="module")
def cluster(tiny_model_dirs):
    """A local Ray instance with Serve's proxy on a free port, serving two replicas; yields the proxy URL."""
    try:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as exc:  # a machine where Ray cannot start (no /dev/shm, ...): say why
        pytest.skip(f"Ray cannot start here: {type(exc).__name__}: {exc}")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(args_for(tiny_model_dirs["llama"], 2)), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def expected(tiny_model_dirs) -> list[float]:
    return expected_rewards(tiny_model_dirs["llama"])


def answered_score_requests() -> list[dict]:
    """Every replica's access records of answered /v1/score requests (JSON lines in Ray's worker logs)."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    records = []
    for name in glob.glob(str(logs / "**" / "*"), recursive=True):
        if not os.path.isfile(name) or not name.endswith((".err", ".out", ".log")):
            continue
        for line in Path(name).read_text(errors="replace").splitlines():
            if line.startswith("{") and '"rmserve.access"' in line:
                record = json.loads(line)
                if record.get("path") == "/v1/score":
                    records.append(record)
    return records


def test_every_route_answers_through_the_proxy_as_a_single_server_does(cluster, expected):
    prompts, responses = [p for p, _ in PAIRS[:8]], [r for _, r in PAIRS[:8]]
    with httpx.Client(base_url=cluster, timeout=60) as http:
        body = {"inputs": [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]}
        scored = http.post("/v1/score", json=body)
        assert scored.status_code == 200, scored.text
        assert scored.json()["rewards"] == pytest.approx(expected[:8], abs=1e-5)
        models = http.get("/v1/models").json()["data"]
        assert [m["kind"] for m in models] == ["dense"]
        text = PAIRS[0][0]
        plain = http.post("/v1/score", json={"inputs": [{"text": text}]}).json()["rewards"][0]
        openrlhf = http.post("/get_reward", json={"query": [text]}).json()  # the trainers' routes
        verl = http.post(
            "/classify", json={"model": models[0]["id"], "input": text, "activation": False}
        ).json()
        assert openrlhf["rewards"] == pytest.approx([plain], abs=1e-6)
        assert verl["data"][-1]["probs"][-1] == pytest.approx(plain, abs=1e-6)
        assert http.get("/ready").status_code == 200 and http.get("/health").status_code == 200
        metrics = http.get("/metrics")
        assert metrics.status_code == 200 and "rmserve_requests_total" in metrics.text
        missing = http.post("/v1/score", json={"inputs": []})
        assert missing.status_code == 422 and "error" in missing.json()


async def _load(url: str, expected: list[float], during) -> int:
    """Eight clients scoring through ``url`` while ``during()`` runs; the calls made (each checked)."""
    stop = asyncio.Event()
    async with AsyncRewardClient(url, max_retries=8, backoff=0.05, timeout=120) as client:
        scoring = asyncio.create_task(keep_scoring(client, expected, stop))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(during)
        await asyncio.sleep(1.0)
        stop.set()
        return await scoring  # any failed call raises here


def replica_actors() -> list[str]:
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]
    )


def test_a_replica_drained_by_serve_loses_nothing_and_scores_nothing_twice(
    cluster, expected, tiny_model_dirs
):
    before = {r["request_id"] for r in answered_score_requests()}
    assert len(replica_actors()) == 2

    def scale_down() -> None:
        serve.run(build(args_for(tiny_model_dirs["llama"], 1)), name=APP, route_prefix="/")

    calls = asyncio.run(_load(cluster, expected, scale_down))
    assert len(replica_actors()) == 1
    records = [r for r in answered_score_requests() if r["request_id"] not in before]
    refused = [r for r in records if r["status"] != 200]
    # a request reaching the replica as it closes is refused unscored (503, retried elsewhere)
    assert all(r["status"] == 503 for r in refused), refused
    assert len(records) - len(refused) == calls  # one scored request per call: none lost, none scored twice
    serve.run(build(args_for(tiny_model_dirs["llama"], 2)), name=APP, route_prefix="/")  # back to two


def test_a_killed_replica_loses_no_call(cluster, expected):
    names = replica_actors()
    assert len(names) == 2

    def kill_one() -> None:
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)

    calls = asyncio.run(_load(cluster, expected, kill_one))
    assert calls > 0  # every call answered with the right rewards (checked in _load)
