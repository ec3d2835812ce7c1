"""In-process API tests: the real app and tiny real models, through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Sequence

import httpx
import pytest
import torch

from rmserve.api.app import create_app
from rmserve.config import LoadOptions, Settings
from rmserve.models.base import HeadOutputs, reward_values
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import EncodedInput, PromptResponse
from tests.api.app_client import serve

BREAD = {
    "prompt": "How do I bake bread?",
    "response": "Mix flour, water, yeast and salt, knead, bake at 230 C.",
}


class GatedModel:
    """Wraps a real model: forwards wait on ``gate``, record what they compute, and can be made to fail."""

    def __init__(self, inner: DenseRewardModel, name: str | None = None) -> None:
        import dataclasses

        self.inner = inner
        self.info = dataclasses.replace(inner.info, name=name or inner.info.name)
        self.gate = threading.Event()
        self.gate.set()
        self.computed: list[tuple[int, ...]] = []
        self.fail_with: Exception | None = None
        self.nan = False

    def new_encoder(self, max_length: int | None = None):
        return self.inner.new_encoder(max_length)

    def score(self, batch: Sequence[EncodedInput], **lambdas: torch.Tensor) -> HeadOutputs:
        assert self.gate.wait(10), "test gate never opened"
        self.computed.extend(e.token_ids for e in batch)
        if self.fail_with is not None:
            raise self.fail_with
        out = self.inner.score(batch, **lambdas)
        if self.nan:
            out.heads[0, 0] = float("nan")
        return out


@pytest.fixture(scope="module")
def bert(tiny_model_dirs):
    return DenseRewardModel("tiny-bert", tiny_model_dirs["bert"], LoadOptions(dtype="float32", device="cpu"))


pytestmark = pytest.mark.anyio


async def test_score_returns_rewards_in_input_order(llama):
    inputs = [BREAD, {"text": "already formatted"}, {"messages": [{"role": "user", "content": "hi"}]}]
    async with serve([llama]) as client:
        r = await client.post("/v1/score", json={"inputs": inputs})
    assert r.status_code == 200, r.text
    body = r.json()
    encoder = llama.new_encoder()
    from rmserve.models.inputs import INPUT_ADAPTER

    encoded = [encoder.encode(INPUT_ADAPTER.validate_python(x)) for x in inputs]
    assert body["model"] == "tiny-llama"
    assert body["rewards"] == pytest.approx([reward_values(llama, [e])[0] for e in encoded], abs=1e-5)
    assert body["truncated"] == [False, False, False]
    assert body["usage"] == {"input_tokens": sum(len(e) for e in encoded)}
    for header in (
        "x-queue-time",
        "x-inference-time",
        "x-tokenization-time",
        "x-total-time",
        "x-request-id",
    ):
        assert header in r.headers
    assert float(r.headers["x-inference-time"]) > 0


async def test_every_request_is_access_logged_with_its_id(llama, caplog):
    with caplog.at_level(logging.INFO, logger="rmserve.access"):
        async with serve([llama]) as client:
            await client.post("/v1/score", json={"inputs": [BREAD]}, headers={"x-request-id": "trace-7"})
    access = [r.access for r in caplog.records if r.name == "rmserve.access"]
    assert access[-1] | {"duration_ms": 0} == {
        "request_id": "trace-7", "method": "POST", "path": "/v1/score", "status": 200, "model": "tiny-llama",
        "duration_ms": 0,
    }  # fmt: skip
    assert access[-1]["duration_ms"] > 0


async def test_request_id_is_echoed(llama):
    async with serve([llama]) as client:
        r = await client.post("/v1/score", json={"inputs": [BREAD]}, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


async def test_several_models_and_model_selection(llama, bert):
    async with serve([llama, bert]) as client:
        default = await client.post("/v1/score", json={"inputs": [BREAD]})
        chosen = await client.post("/v1/score", json={"model": "tiny-bert", "inputs": [BREAD]})
        unknown = await client.post("/v1/score", json={"model": "nope", "inputs": [BREAD]})
        listing = await client.get("/v1/models")
    assert default.json()["model"] == "tiny-llama"
    assert chosen.json()["model"] == "tiny-bert"
    assert chosen.json()["rewards"][0] == pytest.approx(
        reward_values(bert, [bert.new_encoder().encode(PromptResponse(**BREAD))])[0], abs=1e-5
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "model_not_found"
    assert "tiny-llama, tiny-bert" in unknown.json()["error"]["message"]
    cards = listing.json()["data"]
    assert [c["id"] for c in cards] == ["tiny-llama", "tiny-bert"]
    assert cards[0] | {"parameters": 0, "weights_bytes": 0} == {
        "id": "tiny-llama", "aliases": [llama.info.path], "object": "model", "kind": "dense",
        "architecture": "LlamaForSequenceClassification",
        "dtype": "float32", "device": "cpu", "max_length": 256, "parameters": 0, "weights_bytes": 0, "quantize": "none",
        "pooling": "hf", "memory_estimate_bytes": None, "compiled": False, "default": True,
        "heads": ["reward"], "head_std": False, "nominal": "reward", "reward": "mean", "categories": [],
        "aggregates": ["mean", "min", "max", "std", "uwo", "nominal", "tradeoff"],
        "uwo_lambda": 1.0, "tradeoff_lambda": 0.6,
    }  # fmt: skip
    assert cards[0]["parameters"] == llama.info.parameters
    assert cards[0]["weights_bytes"] == sum(
        t.numel() * 4 for t in [*llama.model.parameters(), *llama.model.buffers()]
    )


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({}, "inputs: Field required"),
        ({"inputs": []}, "inputs: List should have at least 1 item"),
        ({"inputs": [{"prompt": "only a prompt"}]}, 'each input is one of {"prompt", "response"}'),
        ({"inputs": [{"text": "x", "extra": 1}]}, "each input is one of"),
        (
            {"inputs": [{"messages": [{"role": "robot", "content": "x"}]}]},
            "inputs[0].messages.messages[0].role",
        ),
        ({"inputs": [{"text": ""}]}, "inputs[0].text.text"),
        ({"inputs": [BREAD], "truncation": "middle"}, "truncation"),
        ({"inputs": [BREAD], "temperature": 1}, "temperature: Extra inputs are not permitted"),
    ],
)
async def test_invalid_requests_get_422_with_a_useful_message(llama, payload, fragment):
    async with serve([llama]) as client:
        r = await client.post("/v1/score", json=payload)
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "invalid_request"
    assert fragment in r.json()["error"]["message"]


async def test_invalid_json_gets_422(llama):
    async with serve([llama]) as client:
        r = await client.post("/v1/score", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "JSON" in r.json()["error"]["message"]


async def test_out_of_vocabulary_ids_name_the_input(llama):
    async with serve([llama]) as client:
        r = await client.post("/v1/score", json={"inputs": [BREAD, {"input_ids": [1, 2, 99999]}]})
    assert r.status_code == 422
    assert r.json()["error"] == {
        "type": "invalid_input",
        "message": "inputs[1]: input_ids contains 99999, outside this model's vocabulary [0, 384); "
        "send ids produced by the model's own tokenizer.",
    }


async def test_truncation_policies(llama):
    long_text = {"text": "word " * 400}
    async with serve([llama], max_length=64) as client:
        left = await client.post("/v1/score", json={"inputs": [long_text, BREAD]})
        right = await client.post("/v1/score", json={"inputs": [long_text], "truncation": "right"})
        refused = await client.post("/v1/score", json={"inputs": [BREAD, long_text], "truncation": "error"})
    assert left.status_code == 200
    assert left.json()["truncated"] == [True, False]
    assert left.json()["usage"]["input_tokens"] == 64 + len(
        llama.new_encoder().encode(PromptResponse(**BREAD))
    )
    assert right.json()["truncated"] == [True]
    assert right.json()["rewards"] != left.json()["rewards"][:1]
    assert refused.status_code == 422
    assert refused.json()["error"]["message"].startswith("inputs[1]: the input has")
    assert "max_length=64" in refused.json()["error"]["message"]


async def test_limits_give_413(llama):
    async with serve([llama], max_inputs_per_request=2, max_request_bytes=2048) as client:
        many = await client.post("/v1/score", json={"inputs": [BREAD] * 3})
        big = await client.post("/v1/score", json={"inputs": [{"text": "x" * 4000}]})
    assert many.status_code == 413
    assert many.json()["error"]["type"] == "too_many_inputs"
    assert big.status_code == 413
    assert big.json()["error"]["type"] == "payload_too_large"


async def test_queue_full_gives_429_with_retry_after(llama):
    gated = GatedModel(llama)
    gated.gate.clear()
    async with serve([gated], max_queue_tokens=64, max_batch_size=1, duplicate_cache_entries=0) as client:
        first = asyncio.create_task(client.post("/v1/score", json={"inputs": [{"input_ids": [5] * 40}]}))
        await asyncio.sleep(0.2)  # the first input is now in the (blocked) forward
        second = asyncio.create_task(client.post("/v1/score", json={"inputs": [{"input_ids": [6] * 40}]}))
        await asyncio.sleep(0.2)  # the second waits in the queue: 40 of 64 tokens
        third = await client.post("/v1/score", json={"inputs": [{"input_ids": [7] * 40}]})
        too_big = await client.post("/v1/score", json={"inputs": [{"input_ids": [7] * 40}] * 2})
        gated.gate.set()
        assert (await first).status_code == 200
        assert (await second).status_code == 200
    assert third.status_code == 429
    assert third.json()["error"]["type"] == "overloaded"
    assert int(third.headers["retry-after"]) >= 1
    assert too_big.status_code == 413


async def test_failing_batch_fails_only_its_requests_and_serving_continues(llama):
    gated = GatedModel(llama)
    async with serve([gated]) as client:
        gated.fail_with = RuntimeError("CUDA error: device-side assert")
        failed = await client.post("/v1/score", json={"inputs": [BREAD]})
        gated.fail_with = None
        gated.nan = True
        nan = await client.post("/v1/score", json={"inputs": [BREAD]})
        gated.nan = False
        ok = await client.post("/v1/score", json={"inputs": [BREAD]})
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "scoring_failed"
    assert "CUDA error: device-side assert" in failed.json()["error"]["message"]
    assert nan.status_code == 500
    assert ok.status_code == 200


async def test_nan_from_the_real_model_fails_its_batch(llama):
    class NanModel(DenseRewardModel):
        pass

    import torch

    model = NanModel.__new__(NanModel)
    model.__dict__.update(llama.__dict__)
    with torch.no_grad():
        head = torch.nn.Linear(llama.head.in_features, 1, bias=False)
        head.weight.fill_(float("nan"))
    model.head = head
    async with serve([model]) as client:
        r = await client.post("/v1/score", json={"inputs": [BREAD]})
    assert r.status_code == 500
    assert "non-finite reward for 1 of 1 inputs" in r.json()["error"]["message"]


async def test_disconnected_client_inputs_are_dropped_before_compute(llama):
    gated = GatedModel(llama)
    gated.gate.clear()
    app = create_app(Settings(max_batch_size=1), models=[gated])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rmserve") as client:
            blocker = asyncio.create_task(client.post("/v1/score", json={"inputs": [{"input_ids": [9, 9]}]}))
            await asyncio.sleep(0.2)
            disconnected = asyncio.Event()
            sent: list[dict] = []
            body = json.dumps({"inputs": [{"input_ids": [4, 4, 4]}, {"input_ids": [5, 5, 5]}]}).encode()
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():
                if messages:
                    return messages.pop(0)
                await disconnected.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                "scheme": "http", "path": "/v1/score", "raw_path": b"/v1/score", "query_string": b"",
                "headers": [(b"content-type", b"application/json"), (b"host", b"rmserve")],
                "server": ("rmserve", 80), "client": ("127.0.0.1", 1), "root_path": "", "state": {},
            }  # fmt: skip
            leaving = asyncio.create_task(app(scope, receive, send))
            await asyncio.sleep(0.2)
            assert app.state.rmserve.registry.get(None).batcher.queued_items == 2
            disconnected.set()
            await asyncio.wait_for(leaving, 5)
            gated.gate.set()
            assert (await blocker).status_code == 200
            after = await client.post("/v1/score", json={"inputs": [{"input_ids": [6]}]})
            metrics = (await client.get("/metrics")).text
    assert after.status_code == 200
    assert gated.computed == [(9, 9), (6,)]
    assert 'rmserve_dropped_inputs_total{model="tiny-llama"} 2.0' in metrics


async def test_a_request_past_its_timeout_gets_504_and_its_inputs_are_dropped(llama):
    gated = GatedModel(llama)
    gated.gate.clear()
    async with serve([gated], max_batch_size=1, request_timeout_s=0.3) as client:
        blocker = asyncio.create_task(client.post("/v1/score", json={"inputs": [{"input_ids": [9, 9]}]}))
        await asyncio.sleep(0.1)
        late = await client.post("/v1/score", json={"inputs": [{"input_ids": [4, 4]}, {"input_ids": [5, 5]}]})
        gated.gate.set()
        first = await blocker
        after = await client.post("/v1/score", json={"inputs": [{"input_ids": [6]}]})  # runs after the drop
        metrics = (await client.get("/metrics")).text
    assert after.status_code == 200
    assert late.status_code == 504
    assert late.json()["error"]["type"] == "timeout"
    assert "request_timeout_s=0.3" in late.json()["error"]["message"]
    assert first.status_code == 504  # it waited on the closed gate just as long
    assert gated.computed == [(9, 9), (6,)]
    assert 'rmserve_dropped_inputs_total{model="tiny-llama"} 2.0' in metrics


async def test_metrics_after_requests(llama):
    async with serve([llama], duplicate_cache_entries=0) as client:
        await client.post("/v1/score", json={"inputs": [BREAD, BREAD]})
        await client.post("/v1/score", json={"model": "nope", "inputs": [BREAD]})
        await client.post("/v1/score", json={"inputs": [BREAD], "aggregates": ["nope"]})  # 422: not counted
        text = (await client.get("/metrics")).text
    assert 'rmserve_requests_total{endpoint="/v1/score",model="tiny-llama",status="200"} 1.0' in text
    assert 'rmserve_requests_total{endpoint="/v1/score",model="",status="404"} 1.0' in text
    assert 'rmserve_batches_total{model="tiny-llama",outcome="ok"} 1.0' in text
    assert 'rmserve_batch_size_count{model="tiny-llama"} 1.0' in text
    assert 'rmserve_queue_depth{model="tiny-llama"} 0.0' in text
    n = len(llama.new_encoder().encode(PromptResponse(**BREAD)))
    assert f'rmserve_real_tokens_total{{model="tiny-llama"}} {float(2 * n)}' in text
    assert f'rmserve_padded_tokens_total{{model="tiny-llama"}} {float(2 * n)}' in text
    assert f'rmserve_input_tokens_total{{model="tiny-llama"}} {float(2 * n)}' in text
    assert f'rmserve_model_weights_bytes{{model="tiny-llama"}} {float(llama.info.weights_bytes)}' in text


async def test_health_and_ready_when_loading_fails(tmp_path):
    app = create_app(Settings(model=str(tmp_path / "missing")))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rmserve") as client:
            for _ in range(100):
                ready = await client.get("/ready")
                if ready.json()["status"] != "loading":
                    break
                await asyncio.sleep(0.05)
            health = await client.get("/health")
            scored = await client.post("/v1/score", json={"inputs": [BREAD]})
    assert ready.status_code == 503
    assert ready.json()["status"] == "failed"
    assert "does not exist; check the model path" in ready.json()["detail"]
    assert health.status_code == 503
    assert scored.status_code == 503
    assert scored.json()["error"]["type"] == "not_ready"
    assert "model loading failed" in scored.json()["error"]["message"]


async def test_ready_when_loaded(llama):
    async with serve([llama]) as client:
        assert (await client.get("/ready")).json() == {"status": "ready", "detail": None}
        assert (await client.get("/health")).json() == {"status": "ok", "detail": None}
        unknown_route = await client.get("/v2/nothing")
    assert unknown_route.status_code == 404
    assert unknown_route.json()["error"]["type"] == "not_found"


async def test_curl_style_form_encoded_json_is_accepted(llama):
    async with serve([llama]) as client:
        r = await client.post(
            "/v1/score",
            content=json.dumps({"inputs": [BREAD]}).encode(),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert r.status_code == 200, r.text
    assert len(r.json()["rewards"]) == 1
