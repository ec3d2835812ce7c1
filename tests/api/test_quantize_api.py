"""``/v1/models`` reports each model's quantisation and its quantised weight memory; quantised models score."""

from __future__ import annotations

import asyncio
import math
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from rmserve.api.app import create_app
from rmserve.config import LoadOptions, ModelSpec, Settings
from rmserve.models.dense import DenseRewardModel
from rmserve.models.quantize import INSTALL_COMMAND
from tests.api.app_client import serve

pytestmark = pytest.mark.anyio

BREAD = {"prompt": "How do I bake bread?", "response": "Mix flour, water, yeast and salt, knead, bake."}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RMSERVE_* variable of the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("RMSERVE_"):
            monkeypatch.delenv(name)


@asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client on an app that loads the settings' models at startup, once loading has ended."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rmserve") as client:
            for _ in range(400):
                if (await client.get("/ready")).json()["status"] != "loading":
                    break
                await asyncio.sleep(0.05)
            yield client


async def test_models_list_shows_quantize_and_quantised_weights(tiny_model_dirs):
    models = [
        DenseRewardModel(
            f"llama-{q}", tiny_model_dirs["llama"], LoadOptions(dtype="float32", device="cpu", quantize=q)
        )
        for q in ("none", "int8", "nf4")
    ]
    async with serve(models) as client:
        cards = {c["id"]: c for c in (await client.get("/v1/models")).json()["data"]}
        scored = await client.post("/v1/score", json={"model": "llama-nf4", "inputs": [BREAD]})
    assert {n: c["quantize"] for n, c in cards.items()} == {
        "llama-none": "none",
        "llama-int8": "int8",
        "llama-nf4": "nf4",
    }
    assert [cards[m.info.name]["weights_bytes"] for m in models] == [m.info.weights_bytes for m in models]
    bytes_ = [cards[f"llama-{q}"]["weights_bytes"] for q in ("none", "int8", "nf4")]
    assert bytes_ == sorted(bytes_, reverse=True) and len(set(bytes_)) == 3
    assert scored.status_code == 200 and math.isfinite(scored.json()["rewards"][0])


async def test_settings_quantize_reaches_the_models_loaded_at_startup(tiny_model_dirs):
    path = str(tiny_model_dirs["llama"])
    settings = Settings(
        quantize="int8",
        device="cpu",
        models=(ModelSpec(name="int8", path=path), ModelSpec(name="plain", path=path, quantize="none")),
    )
    async with started(settings) as client:
        cards = {c["id"]: c for c in (await client.get("/v1/models")).json()["data"]}
        scored = await client.post("/v1/score", json={"model": "int8", "inputs": [BREAD]})
    assert {n: c["quantize"] for n, c in cards.items()} == {"int8": "int8", "plain": "none"}
    assert scored.status_code == 200 and math.isfinite(scored.json()["rewards"][0])


async def test_missing_bitsandbytes_fails_loading_with_the_install_command(tiny_model_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    settings = Settings(model=str(tiny_model_dirs["llama"]), quantize="nf4", device="cpu")
    async with started(settings) as client:
        ready = await client.get("/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "failed"
    assert "needs bitsandbytes, which is not installed" in ready.json()["detail"]
    assert INSTALL_COMMAND in ready.json()["detail"]
