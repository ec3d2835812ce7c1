"""API keys: every route but /health and /ready needs a valid Bearer key; failures all look alike."""

from __future__ import annotations

import logging

import pytest

from rmserve.api.app import create_app
from rmserve.config import LoadOptions, Settings
from rmserve.models.dense import DenseRewardModel
from tests.api.app_client import serve

pytestmark = pytest.mark.anyio
KEYS = "first-key-0123456789, second-key-abcdefghij"
BODY = {"inputs": [{"text": "hello"}]}


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return DenseRewardModel(
        "tiny-llama", tiny_model_dirs["llama"], LoadOptions(dtype="float32", device="cpu")
    )


async def test_valid_keys_are_accepted_on_every_route(llama):
    async with serve([llama], api_key=KEYS) as client:
        for key in ("first-key-0123456789", "second-key-abcdefghij"):
            headers = {"authorization": f"Bearer {key}"}
            assert (await client.post("/v1/score", json=BODY, headers=headers)).status_code == 200
            assert (await client.get("/v1/models", headers=headers)).status_code == 200
            assert (await client.get("/metrics", headers=headers)).status_code == 200
            assert (
                await client.post("/get_reward", json={"query": ["hi"]}, headers=headers)
            ).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": "Bearer first-key-012345678"},  # a prefix of a real key
        {"authorization": "Basic first-key-0123456789"},  # the right key, the wrong scheme
        {"authorization": "first-key-0123456789"},
        {"authorization": "Bearer first-key-0123456789, second-key-abcdefghij"},
    ],
)
async def test_every_failure_gets_the_same_401(llama, headers):
    async with serve([llama], api_key=KEYS) as client:
        scored = await client.post("/v1/score", json=BODY, headers=headers)
        listing = await client.get("/v1/models", headers=headers)
        docs = await client.get("/openapi.json", headers=headers)
    for r in (scored, listing, docs):
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "unauthorized"
        assert "x-request-id" in r.headers
    assert scored.json() == listing.json()  # no hint of which part was wrong


async def test_health_and_ready_stay_open(llama):
    async with serve([llama], api_key=KEYS) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 200


async def test_without_keys_nothing_is_required(llama):
    async with serve([llama]) as client:
        assert (await client.post("/v1/score", json=BODY)).status_code == 200


def test_keys_never_appear_in_settings_reprs_or_logs(caplog):
    settings = Settings(api_key=KEYS)
    assert "first-key" not in repr(settings) and "first-key" not in str(settings.model_dump())
    assert settings.api_keys() == ["first-key-0123456789", "second-key-abcdefghij"]
    with caplog.at_level(logging.DEBUG):
        create_app(settings, models=[])
    assert "first-key" not in caplog.text
    with pytest.raises(ValueError, match="holds no key"):
        Settings(api_key=" , ").api_keys()
