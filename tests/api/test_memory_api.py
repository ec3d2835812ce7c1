"""Memory planning through the app: the figures in /v1/models and /metrics, and a refused plan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rmserve.api.app import create_app
from rmserve.config import LoadOptions, ModelSpec, Settings
from rmserve.models.loader import load_model
from rmserve.scoring import loading
from rmserve.scoring.loading import plan_loading
from tests.api.app_client import serve

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def serve_loading(**settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client on an app that loads the settings' models itself, once loading has finished or failed."""
    app = create_app(Settings(**settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rmserve") as client:
            for _ in range(1200):
                ready = await client.get("/ready")
                if ready.status_code == 200 or ready.json()["status"] == "failed":
                    break
                await asyncio.sleep(0.05)
            yield client


def memory_gauges(exposition: str) -> dict[tuple[str, str], float]:
    """The memory gauges of a /metrics page, by (name, model or device label)."""
    return {
        (sample.name, sample.labels.get("model") or sample.labels.get("device", "")): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if "memory" in sample.name
    }


def specs_for(tiny_model_dirs: dict[str, Path], tiny_head_model_dirs: dict[str, Path]) -> list[ModelSpec]:
    return [
        ModelSpec(name="rm", path=str(tiny_model_dirs["llama"])),
        ModelSpec(name="heads", path=str(tiny_head_model_dirs["brme"]), max_batch_tokens=512),
    ]


async def test_models_and_metrics_show_the_plan(tiny_model_dirs, tiny_head_model_dirs) -> None:
    specs = specs_for(tiny_model_dirs, tiny_head_model_dirs)
    settings = dict(models=specs, device="cpu", max_batch_tokens=1024, memory_budget="4GiB")
    planned = plan_loading(Settings(**settings)).memory
    async with serve_loading(**settings) as client:
        assert (await client.get("/ready")).status_code == 200
        cards = {card["id"]: card for card in (await client.get("/v1/models")).json()["data"]}
        gauges = memory_gauges((await client.get("/metrics")).text)
    for name in ("rm", "heads"):
        estimate = planned.estimate(name)
        assert cards[name]["memory_estimate_bytes"] == estimate.total_bytes
        assert cards[name]["weights_bytes"] == estimate.weights_bytes
        assert gauges[("rmserve_model_memory_estimate_bytes", name)] == estimate.total_bytes
    assert gauges[("rmserve_device_memory_budget_bytes", "cpu")] == 4 * 2**30


async def test_an_over_budget_config_fails_the_load_before_any_model_loads(
    tiny_model_dirs, tiny_head_model_dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is served half-loaded: /ready and /health say failed with the plan, scoring answers 503."""

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded although the plan is over budget")

    monkeypatch.setattr(loading, "load_model", no_loading)
    specs = specs_for(tiny_model_dirs, tiny_head_model_dirs)
    async with serve_loading(models=specs, device="cpu", memory_budget="1MB") as client:
        ready = await client.get("/ready")
        health = await client.get("/health")
        listing = await client.get("/v1/models")
        scored = await client.post("/v1/score", json={"inputs": [{"text": "hello"}]})
        gauges = memory_gauges((await client.get("/metrics")).text)
    assert ready.status_code == health.status_code == listing.status_code == scored.status_code == 503
    assert ready.json()["status"] == health.json()["status"] == "failed"
    detail = ready.json()["detail"]
    assert detail.startswith("MemoryBudgetError: the models on cpu do not fit its memory budget")
    for expected in ("rm on cpu: weights", "heads on cpu: weights", "976.56 KiB budget", "Hint:"):
        assert expected in detail, detail
    assert "model loading failed: MemoryBudgetError" in scored.json()["error"]["message"]
    assert gauges == {}


async def test_models_loaded_by_the_caller_have_no_estimate(tiny_model_dirs) -> None:
    model = load_model("rm", tiny_model_dirs["llama"], LoadOptions(device="cpu"))
    async with serve([model]) as client:
        card = (await client.get("/v1/models")).json()["data"][0]
    assert card["memory_estimate_bytes"] is None
    assert card["weights_bytes"] == model.info.weights_bytes
