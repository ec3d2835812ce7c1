"""End-to-end: a real uvicorn process on 127.0.0.1, driven over HTTP like an RLHF trainer would."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import httpx
import pytest

from rmserve.config import LoadOptions
from rmserve.launch import CLEAN_EXIT, start_server
from rmserve.models.base import reward_values
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import INPUT_ADAPTER

DIALOGUES = [
    {"prompt": f"Question number {i}: what is {i} plus {i}?", "response": f"It is {2 * i}. " * (1 + i % 7)}
    for i in range(48)
]


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    srv = start_server(
        ["--model", str(tiny_model_dirs["llama"]), "--max-wait-ms", "5", "--dtype", "float32"],
        tmp_path_factory.mktemp("logs") / "server.log",
    )
    yield srv
    assert srv.stop() == CLEAN_EXIT, srv.log_text()
    assert "Application shutdown complete" in srv.log_text()


@pytest.fixture(scope="module")
def offline(tiny_model_dirs):
    model = DenseRewardModel("llama", tiny_model_dirs["llama"], LoadOptions(dtype="float32", device="cpu"))
    encoder = model.new_encoder()
    return [reward_values(model, [encoder.encode(INPUT_ADAPTER.validate_python(d))])[0] for d in DIALOGUES]


def test_curl_example(server):
    payload = '{"inputs":[{"prompt":"How do I bake bread?","response":"Mix flour, water, yeast and salt."}]}'
    out = subprocess.run(
        ["curl", "-s", f"{server.url}/v1/score", "-d", payload], capture_output=True, text=True, check=True
    )
    body = json.loads(out.stdout)
    assert body["model"] == "llama"
    assert len(body["rewards"]) == 1


def test_concurrent_single_rollout_clients_are_batched_and_exact(server, offline):
    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/score", json={"inputs": [d]}) for d in DIALOGUES))

    before = httpx.get(f"{server.url}/metrics").text
    responses = asyncio.run(run())
    after = httpx.get(f"{server.url}/metrics").text
    assert [r.status_code for r in responses] == [200] * len(DIALOGUES)
    rewards = [r.json()["rewards"][0] for r in responses]
    assert rewards == pytest.approx(offline, abs=1e-4)
    batches = _counter(after, 'rmserve_batches_total{model="llama",outcome="ok"}') - _counter(
        before, 'rmserve_batches_total{model="llama",outcome="ok"}'
    )
    assert batches < len(DIALOGUES) / 2, f"{batches} batches for {len(DIALOGUES)} concurrent requests"


def test_one_request_larger_than_a_batch_is_split_and_reassembled(tiny_model_dirs, tmp_path, offline):
    srv = start_server(
        ["--model", str(tiny_model_dirs["llama"]), "--max-batch-size", "4", "--max-batch-tokens", "256"],
        tmp_path / "server.log",
    )
    try:
        r = httpx.post(f"{srv.url}/v1/score", json={"inputs": DIALOGUES}, timeout=60)
        metrics = httpx.get(f"{srv.url}/metrics").text
    finally:
        assert srv.stop() == CLEAN_EXIT
    assert r.json()["rewards"] == pytest.approx(offline, abs=1e-4)
    assert _counter(metrics, 'rmserve_batches_total{model="llama",outcome="ok"}') >= len(DIALOGUES) / 4


def test_sigterm_answers_every_accepted_request(tiny_model_dirs, tmp_path):
    srv = start_server(
        ["--model", str(tiny_model_dirs["llama"]), "--max-batch-size", "2"], tmp_path / "server.log"
    )

    async def load() -> list[int]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            tasks = [
                asyncio.create_task(client.post("/v1/score", json={"inputs": [d] * 4}))
                for d in DIALOGUES[:24]
            ]
            await asyncio.sleep(0.3)
            srv.process.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return [r.status_code if isinstance(r, httpx.Response) else -1 for r in results]

    statuses = asyncio.run(load())
    code = srv.process.wait(60)
    assert code == CLEAN_EXIT, srv.log_text()
    # every request was sent before the signal, so every one must be answered in full
    assert statuses == [200] * 24, statuses
    assert "Application shutdown complete" in srv.log_text()


def test_offline_score_command_matches_the_server(server, tiny_model_dirs, tmp_path, offline):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": i, **d}) + "\n" for i, d in enumerate(DIALOGUES)))
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "rmserve", "score", str(data), "--model", str(tiny_model_dirs["llama"]), "-o", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(DIALOGUES)))
    assert [r["reward"] for r in rows] == pytest.approx(offline, abs=1e-4)
    assert all(r["truncated"] is False and r["input_tokens"] > 0 for r in rows)
    assert f"scored {len(DIALOGUES)} inputs" in done.stderr


def test_serve_refuses_a_folder_that_is_not_a_model(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "rmserve", "serve", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "is not a model folder (no config.json or rmserve.json)" in done.stderr


def _counter(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_hangs_up_has_its_queued_inputs_dropped(tiny_model_dirs, tmp_path):
    srv = start_server(
        # the duplicate cache off: the repeated inputs must really queue
        ["--model", str(tiny_model_dirs["llama"]), "--max-batch-size", "1", "--duplicate-cache-entries", "0"],
        tmp_path / "server.log",
    )
    try:

        async def scenario() -> int:
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
                long = asyncio.create_task(client.post("/v1/score", json={"inputs": DIALOGUES * 12}))
                await asyncio.sleep(0.3)  # the long request's inputs now fill the queue
                with pytest.raises(httpx.ReadTimeout):
                    await client.post("/v1/score", json={"inputs": DIALOGUES[:20]}, timeout=0.3)
                return (await long).status_code

        assert asyncio.run(scenario()) == 200
        metrics = httpx.get(f"{srv.url}/metrics").text
    finally:
        assert srv.stop() == CLEAN_EXIT
    assert _counter(metrics, 'rmserve_dropped_inputs_total{model="llama"}') == 20
    assert _counter(metrics, 'rmserve_real_tokens_total{model="llama"}') > 0


def test_json_logs_carry_each_request_with_its_id(tiny_model_dirs, tmp_path):
    log = tmp_path / "server.log"
    srv = start_server(["--model", str(tiny_model_dirs["llama"]), "--log-format", "json"], log)
    try:
        r = httpx.post(
            f"{srv.url}/v1/score", json={"inputs": [{"text": "hi"}]}, headers={"x-request-id": "trace-json"}
        )
        assert r.headers["x-request-id"] == "trace-json"
    finally:
        assert srv.stop() == CLEAN_EXIT, srv.log_text()
    lines = [json.loads(line) for line in srv.log_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("request_id") == "trace-json"]
    assert access and access[0]["status"] == 200 and access[0]["path"] == "/v1/score"
    assert any(
        line["logger"].startswith("uvicorn") for line in lines
    )  # the server's own records are JSON too
