"""Robust aggregates through the API: columnar aggregates, heads, sigmas, lambdas, validation."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from rmserve.config import LoadOptions, ModelSpec
from rmserve.models.dense import DenseRewardModel
from rmserve.models.heads import MultiHeadRewardModel
from rmserve.models.inputs import INPUT_ADAPTER
from rmserve.names import AGGREGATES
from tests.api.app_client import serve

INPUTS = [
    {"prompt": "How do I bake bread?", "response": "Mix flour, water, yeast and salt, then bake."},
    {"text": "already formatted text"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
]

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def multihead(tiny_head_model_dirs):
    return MultiHeadRewardModel(
        "tiny-multi", tiny_head_model_dirs["multihead"], LoadOptions(dtype="float32", device="cpu")
    )


@pytest.fixture(scope="module")
def dense(tiny_model_dirs):
    return DenseRewardModel(
        "tiny-llama", tiny_model_dirs["llama"], LoadOptions(dtype="float32", device="cpu")
    )


def offline(model, inputs, uwo: float, trade: float):
    """Each input alone through the backend, with the given lambdas."""
    encoder = model.new_encoder()
    outs = [
        model.score(
            [encoder.encode(INPUT_ADAPTER.validate_python(x))],
            uwo_lambda=torch.tensor([uwo]),
            tradeoff_lambda=torch.tensor([trade]),
        )
        for x in inputs
    ]
    return outs


async def test_brme_returns_every_aggregate_heads_and_sigmas(brme):
    body = {"model": "tiny-brme", "inputs": INPUTS, "aggregates": list(AGGREGATES), "return_heads": True}
    async with serve([brme]) as client:
        r = await client.post("/v1/score", json=body | {"uwo_lambda": 0.5, "tradeoff_lambda": 0.25})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["reward"] == "tradeoff"
    assert list(got["aggregates"]) == list(AGGREGATES)
    expected = offline(brme, INPUTS, 0.5, 0.25)
    for row, out in enumerate(expected):
        for column, name in enumerate(AGGREGATES):
            assert got["aggregates"][name][row] == pytest.approx(
                float(out.aggregates[0, column]), abs=1e-5, rel=1e-5
            )
        assert got["heads"][row] == pytest.approx(out.heads[0].tolist(), abs=1e-5, rel=1e-5)
        assert got["head_std"][row] == pytest.approx(out.head_std[0].tolist(), abs=1e-5, rel=1e-5)
        assert got["rewards"][row] == got["aggregates"]["tradeoff"][row]
        # the nominal reward is the mu of the head with the smallest sigma
        sigmas = got["head_std"][row]
        assert got["aggregates"]["nominal"][row] == pytest.approx(
            got["heads"][row][sigmas.index(min(sigmas))]
        )


async def test_defaults_apply_and_aggregates_are_optional(multihead):
    async with serve([multihead]) as client:
        plain = (await client.post("/v1/score", json={"inputs": INPUTS})).json()
        some = (
            await client.post("/v1/score", json={"inputs": INPUTS, "aggregates": ["uwo", "min", "uwo"]})
        ).json()
    assert plain["aggregates"] == {} and plain["heads"] is None and plain["head_std"] is None
    assert plain["reward"] == "mean"
    expected = offline(multihead, INPUTS, 1.0, 0.6)
    assert plain["rewards"] == pytest.approx(
        [float(o.aggregates[0, 0]) for o in expected], abs=1e-5, rel=1e-5
    )
    assert list(some["aggregates"]) == ["uwo", "min"]
    assert some["aggregates"]["uwo"] == pytest.approx(
        [float(o.aggregates[0, 4]) for o in expected], abs=1e-5, rel=1e-5
    )


async def test_multihead_heads_without_sigmas(multihead):
    async with serve([multihead]) as client:
        got = (await client.post("/v1/score", json={"inputs": INPUTS, "return_heads": True})).json()
    assert [len(h) for h in got["heads"]] == [5, 5, 5]
    assert got["head_std"] is None


async def test_dense_model_answers_as_one_head(dense):
    async with serve([dense]) as client:
        got = (
            await client.post(
                "/v1/score", json={"inputs": INPUTS, "aggregates": list(AGGREGATES), "return_heads": True}
            )
        ).json()
    for name in AGGREGATES:
        expected = [0.0] * 3 if name == "std" else got["rewards"]
        assert got["aggregates"][name] == pytest.approx(expected, abs=1e-6), name
    assert got["heads"] == [[r] for r in got["rewards"]]
    assert got["head_std"] is None


async def test_concurrent_requests_with_different_lambdas_share_batches(brme):
    lambdas = [(0.0, 0.0), (2.0, 1.0), (0.5, 0.3), (1.0, 0.6)]
    async with serve([brme], max_wait_ms=50) as client:
        replies = await asyncio.gather(
            *(
                client.post(
                    "/v1/score",
                    json={
                        "inputs": INPUTS,
                        "aggregates": ["uwo", "tradeoff"],
                        "uwo_lambda": u,
                        "tradeoff_lambda": t,
                    },
                )
                for u, t in lambdas
            )
        )
        metrics = (await client.get("/metrics")).text
    for reply, (u, t) in zip(replies, lambdas, strict=True):
        expected = offline(brme, INPUTS, u, t)
        got = reply.json()["aggregates"]
        assert got["uwo"] == pytest.approx([float(o.aggregates[0, 4]) for o in expected], abs=1e-5, rel=1e-5)
        assert got["tradeoff"] == pytest.approx(
            [float(o.aggregates[0, 6]) for o in expected], abs=1e-5, rel=1e-5
        )
    batches = [line for line in metrics.splitlines() if line.startswith("rmserve_batches_total{")]
    assert batches and float(batches[0].split()[-1]) < len(lambdas)  # requests were batched together


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("uwo_lambda", -0.1, "greater than or equal to 0"),
        ("tradeoff_lambda", 1.5, "less than or equal to 1"),
        ("tradeoff_lambda", -1, "greater than or equal to 0"),
        ("aggregates", ["median"], "mean"),
    ],
)
async def test_invalid_aggregation_parameters_get_422(dense, field, value, fragment):
    async with serve([dense]) as client:
        r = await client.post("/v1/score", json={"inputs": INPUTS, field: value})
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "invalid_request"
    assert field in r.json()["error"]["message"] and fragment in r.json()["error"]["message"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity"])
async def test_non_finite_lambdas_get_422(dense, literal):
    raw = '{"inputs": [{"text": "hi"}], "uwo_lambda": ' + literal + "}"
    async with serve([dense]) as client:
        r = await client.post("/v1/score", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert "uwo_lambda" in r.json()["error"]["message"]


async def test_models_list_heads_aggregates_and_config_overrides(brme, multihead, tiny_head_model_dirs):
    brme_dir = tiny_head_model_dirs["brme"]
    specs = [
        ModelSpec(name="tiny-brme", path="x", uwo_lambda=0.2),
        ModelSpec(name="tiny-multi", path="y", reward="min", tradeoff_lambda=0.9),
    ]
    async with serve([brme, multihead], specs=specs) as client:
        cards = {c["id"]: c for c in (await client.get("/v1/models")).json()["data"]}
        got = (
            await client.post(
                "/v1/score", json={"model": "tiny-multi", "inputs": INPUTS, "aggregates": ["min"]}
            )
        ).json()
    assert cards["tiny-brme"] | {"parameters": 0, "weights_bytes": 0} == {
        "id": "tiny-brme", "aliases": [str(brme_dir)], "object": "model", "kind": "brme",
        "architecture": "LlamaModel + 5 brme heads",
        "dtype": "float32", "device": "cpu", "max_length": 256, "parameters": 0, "weights_bytes": 0, "quantize": "none",
        "pooling": "hf", "memory_estimate_bytes": None, "compiled": False, "default": True,
        "heads": ["head0", "head1", "head2", "head3", "head4"], "head_std": True,
        "nominal": "per input, the head with the smallest sigma", "reward": "tradeoff", "categories": [],
        "aggregates": list(AGGREGATES), "uwo_lambda": 0.2, "tradeoff_lambda": 0.6,
    }  # fmt: skip
    assert (cards["tiny-multi"]["nominal"], cards["tiny-multi"]["reward"]) == ("head2", "min")
    assert cards["tiny-multi"]["tradeoff_lambda"] == 0.9
    assert got["reward"] == "min" and got["rewards"] == got["aggregates"]["min"]
    assert all(math.isfinite(x) for x in got["rewards"])


async def test_request_level_tradeoff_uses_the_head_with_the_lowest_mean_over_the_request(multihead):
    body = {
        "model": "tiny-multi",
        "inputs": INPUTS,
        "aggregates": ["nominal", "tradeoff"],
        "return_heads": True,
    }
    async with serve([multihead]) as client:
        per_input = (await client.post("/v1/score", json=body)).json()
        r = await client.post("/v1/score", json=body | {"tradeoff_scope": "request", "tradeoff_lambda": 0.4})
    assert r.status_code == 200, r.text
    got = r.json()
    heads = torch.tensor(got["heads"])  # (N, k)
    worst = int(heads.mean(dim=0).argmin())
    want = [0.4 * n + 0.6 * h[worst] for n, h in zip(got["aggregates"]["nominal"], got["heads"], strict=True)]
    assert got["aggregates"]["tradeoff"] == pytest.approx(want, abs=1e-6)
    assert (
        got["heads"] == per_input["heads"]
        and got["aggregates"]["nominal"] == per_input["aggregates"]["nominal"]
    )


async def test_brme_sample_is_seeded_returns_its_seed_and_is_refused_for_models_without_sigmas(brme, dense):
    body = {"model": "tiny-brme", "inputs": INPUTS, "aggregates": ["mean", "tradeoff"], "return_heads": True}
    async with serve([brme, dense]) as client:
        plain = (await client.post("/v1/score", json=body)).json()
        seeded = await client.post("/v1/score", json=body | {"brme_sample": True, "brme_seed": 7})
        again = (await client.post("/v1/score", json=body | {"brme_sample": True, "brme_seed": 7})).json()
        fresh = (await client.post("/v1/score", json=body | {"brme_sample": True})).json()
        no_sigma = await client.post(
            "/v1/score", json={"model": "tiny-llama", "inputs": INPUTS, "brme_sample": True}
        )
        seed_alone = await client.post("/v1/score", json=body | {"brme_seed": 7})
    assert seeded.status_code == 200, seeded.text
    got = seeded.json()
    assert got["brme_seed"] == 7 and plain["brme_seed"] is None
    mu, sigma = torch.tensor(plain["heads"]), torch.tensor(plain["head_std"])
    a = torch.randn(mu.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(torch.tensor(got["heads"]), mu + a * sigma, atol=1e-5, rtol=1e-5)
    assert got["aggregates"]["mean"] == pytest.approx(
        torch.tensor(got["heads"]).mean(dim=1).tolist(), abs=1e-5
    )
    assert again["heads"] == got["heads"] and again["rewards"] == got["rewards"]
    assert isinstance(fresh["brme_seed"], int) and fresh["heads"] != got["heads"]
    assert no_sigma.status_code == 422
    assert "without sigmas; drop brme_sample or ask a brme model" in no_sigma.json()["error"]["message"]
    assert seed_alone.status_code == 422
    assert 'add "brme_sample": true or drop brme_seed' in seed_alone.json()["error"]["message"]
