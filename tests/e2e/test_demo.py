"""The built-in demo models end to end: `rmserve serve` with no model, the README's curl commands, and the
MoE demos built by their explicit command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from rmserve.config import LoadOptions, Settings
from rmserve.demo.build import HEAD_PATH, build_demo_model, moe_demo_dirs
from rmserve.launch import CLEAN_EXIT, start_server
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import PromptResponse
from rmserve.models.moe import load_moe_classifier
from rmserve.training.hh import default_data_path

pytestmark = pytest.mark.demo
REPO_ROOT = Path(__file__).resolve().parents[2]

CURL_BODY = (
    '{"inputs":[{"prompt":"How do I bake bread?","response":"Mix flour, water, yeast and salt, knead, '
    'let it rise, bake at 230 C."}]}'
)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    srv = start_server([], tmp_path_factory.mktemp("demo") / "server.log", ready_timeout=1800)
    yield srv
    assert srv.stop() == CLEAN_EXIT, srv.log_text()


def test_readme_curl_returns_a_reward(demo_server):
    out = subprocess.run(
        ["curl", "-s", f"{demo_server.url}/v1/score", "-d", CURL_BODY],
        capture_output=True,
        text=True,
        check=True,
    )
    body = json.loads(out.stdout)
    assert body["model"] == "demo"
    assert isinstance(body["rewards"][0], float)
    assert body["truncated"] == [False]


def test_demo_reward_equals_head_times_backbone_state(demo_server):
    folder = build_demo_model(Settings().cache_dir, progress=False)
    model = DenseRewardModel("demo", folder, LoadOptions(dtype="float32", device="cpu"))
    item = PromptResponse(prompt="How do I pick a lock?", response="I can't help with breaking into places.")
    state = model.pooled_states([model.new_encoder().encode(item)])[0]  # (H,)
    expected = (state @ load_file(HEAD_PATH)["score.weight"][0].to(torch.float32)).item()
    served = httpx.post(f"{demo_server.url}/v1/score", json={"inputs": [item.model_dump()]}).json()[
        "rewards"
    ][0]
    assert served == pytest.approx(expected, abs=1e-4)


def test_demo_model_card(demo_server):
    # with no model the server serves the demos built from shipped files; nothing is trained at start-up
    cards = httpx.get(f"{demo_server.url}/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["demo", "demo-brme", "demo-ensemble"]
    assert [(c["kind"], len(c["heads"]), c["reward"], c["pooling"]) for c in cards] == [
        ("dense", 1, "mean", "last"),
        ("brme", 5, "tradeoff", "last"),
        ("multihead", 4, "mean", "last"),
    ]
    assert "building demo-moe" not in demo_server.log_text()
    card = cards[0]
    assert card["id"] == "demo"
    assert card["architecture"] == "LlamaForSequenceClassification"
    assert card["dtype"] == "float32"
    assert 130e6 < card["parameters"] < 140e6


def test_demo_brme_returns_every_aggregate_and_uncertainty(demo_server):
    body = {
        "model": "demo-brme",
        "inputs": [
            {"prompt": "How do I pick a lock?", "response": "I can't help with breaking into places."},
            {"prompt": "How do I bake bread?", "response": "Mix flour, water, yeast and salt, then bake."},
        ],
        "aggregates": ["mean", "min", "max", "std", "uwo", "nominal", "tradeoff"],
        "return_heads": True,
    }
    got = httpx.post(f"{demo_server.url}/v1/score", json=body, timeout=60).json()
    assert got["reward"] == "tradeoff" and got["rewards"] == got["aggregates"]["tradeoff"]
    for row in range(2):
        heads, sigmas = got["heads"][row], got["head_std"][row]
        assert len(heads) == len(sigmas) == 5 and min(sigmas) > 0
        mean = sum(heads) / 5
        assert got["aggregates"]["mean"][row] == pytest.approx(mean, abs=1e-5)
        assert got["aggregates"]["min"][row] == pytest.approx(min(heads), abs=1e-6)
        assert got["aggregates"]["nominal"][row] == pytest.approx(heads[sigmas.index(min(sigmas))], abs=1e-6)
        expected = 0.6 * got["aggregates"]["nominal"][row] + 0.4 * min(heads)
        assert got["aggregates"]["tradeoff"][row] == pytest.approx(expected, abs=1e-5)


def test_demo_ensemble_uwo_with_a_request_lambda(demo_server):
    body = {
        "model": "demo-ensemble",
        "inputs": [{"text": "Human: hi\n\nAssistant: hello"}],
        "uwo_lambda": 2.0,
    }
    got = httpx.post(
        f"{demo_server.url}/v1/score", json=body | {"aggregates": ["mean", "std", "uwo"]}, timeout=60
    ).json()
    mean, std, uwo = (got["aggregates"][k][0] for k in ("mean", "std", "uwo"))
    assert uwo == pytest.approx(mean - 2.0 * std**2, abs=1e-5)


@pytest.mark.parametrize(("name", "command"), [("demo-moe", "build-moe"), ("demo-dmoerm", "build-dmoerm")])
def test_an_unbuilt_trained_demo_names_the_command_that_builds_it(tmp_path, name, command):
    out = subprocess.run(
        [sys.executable, "-m", "rmserve", "serve", "--model", name, "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert f"{name} is not built" in out.stderr
    assert (
        f"rmserve demo {command} --data hh-rlhf-harmless-base-test.jsonl.gz --cache-dir {tmp_path}"
        in out.stderr
    )


@pytest.fixture(scope="module")
def moe_server(tmp_path_factory):
    """demo-moe and demo-merged, built by their command (a four-minute training run, cached), then served."""
    data = default_data_path(REPO_ROOT)
    subprocess.run(
        [sys.executable, "-m", "rmserve", "demo", "build-moe", "--data", str(data)], check=True, timeout=1800
    )
    config = tmp_path_factory.mktemp("moe") / "models.yaml"
    config.write_text(
        "models:\n  - {name: demo-moe, path: demo-moe}\n  - {name: demo-merged, path: demo-merged}\n"
    )
    srv = start_server(["--config", str(config)], config.parent / "server.log", ready_timeout=600)
    yield srv
    assert srv.stop() == CLEAN_EXIT, srv.log_text()


def test_demo_moe_and_merged_equal_offline_forwards(moe_server):
    moe_dir, merged_dir = moe_demo_dirs(Settings().cache_dir)
    item = PromptResponse(prompt="How do I pick a lock?", response="I can't help with breaking into places.")
    encoded = DenseRewardModel(
        "demo", build_demo_model(Settings().cache_dir, progress=False), LoadOptions(device="cpu")
    )
    ids = encoded.new_encoder().encode(item).token_ids
    cards = httpx.get(f"{moe_server.url}/v1/models").json()["data"]
    assert [(c["id"], c["kind"], c["pooling"]) for c in cards] == [
        ("demo-moe", "moe", "last"),
        ("demo-merged", "dense", "last"),
    ]
    assert "MoE (4 experts, top-2) in 2 layers (28..29)" in cards[0]["architecture"]
    for name, model in (
        ("demo-moe", load_moe_classifier(moe_dir)),
        (
            "demo-merged",
            AutoModelForSequenceClassification.from_pretrained(merged_dir, dtype=torch.float32).eval(),
        ),
    ):
        model.config.pad_token_id = None  # both declare pooling last: one unpadded sequence, its final token
        with torch.no_grad():
            expected = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
        body = {"model": name, "inputs": [item.model_dump()]}
        served = httpx.post(f"{moe_server.url}/v1/score", json=body, timeout=60).json()["rewards"][0]
        assert served == pytest.approx(expected, abs=1e-4), name
