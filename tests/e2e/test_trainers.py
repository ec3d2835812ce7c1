"""The trainers' current client code, against a real server with an API key on 127.0.0.1.

- verl: its loader (``get_custom_reward_fn``: ``pkg://`` path, ``reward_kwargs`` merged over the call's
  keywords, ``inspect.iscoroutinefunction`` on the partial) and its reward managers' call shapes (the
  reward loop awaits an async function per rollout, concurrently, and runs a sync one in a thread; the
  legacy batch manager calls it directly), with ``rmserve_client.verl``;
- OpenRLHF (0.9.1 and later, ``SingleTurnAgentExecutor._fetch_rewards_via_http``): one rollout per call,
  sharded over its ``--reward.remote_url`` list, so with two URLs the second gets ``{"query": []}``; no
  headers, so the key travels in the path. Its aiohttp session is replaced by httpx (not installed here);
  the URLs, bodies and the reading of the answer are its own.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import httpx
import pytest
import yaml

from rmserve.launch import CLEAN_EXIT, start_server
from rmserve_client import RewardClient
from rmserve_client.verl import VerlSettings, aclose_clients, close_clients, compute_score, make_compute_score

KEY = "trainer-key-0123456789"
PROMPT = "How do I bake bread?"
RESPONSES = [f"Mix flour and water, then bake for {i} minutes." for i in range(6)]


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tiny_head_model_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trainers")
    config = folder / "serve.yaml"
    models = [
        {"name": "tiny-llama", "path": str(tiny_model_dirs["llama"])},
        {"name": "tiny-brme", "path": str(tiny_head_model_dirs["brme"])},
    ]
    config.write_text(
        yaml.safe_dump({"dtype": "float32", "max_wait_ms": 5, "monitor_window": 4, "models": models})
    )
    srv = start_server(["--config", str(config)], folder / "server.log", env={"RMSERVE_API_KEY": KEY})
    yield srv
    assert srv.stop() == CLEAN_EXIT, srv.log_text()


@pytest.fixture(scope="module")
def reference(server):
    """What the client's own call gives for each rollout: rewards, aggregates, heads and sigmas."""
    conversations = [
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": r}] for r in RESPONSES
    ]
    with RewardClient(server.url, api_key=KEY, model="tiny-brme") as client:
        result = client.score_messages(conversations, aggregates=["min", "uwo"], return_heads=True)
        (info,) = [m for m in client.models() if m.id == "tiny-brme"]
    return result, info


def run(awaitable: Any) -> Any:
    """``asyncio.run`` that closes the clients ``compute_score`` opened on that loop before it ends."""

    async def main() -> Any:
        try:
            return await awaitable
        finally:
            await aclose_clients()

    return asyncio.run(main())


def load_like_verl(name: str, reward_kwargs: dict[str, Any]) -> Any:
    """verl.trainer.ppo.reward.get_custom_reward_fn, for a pkg:// path."""
    raw_fn = getattr(importlib.import_module("rmserve_client.verl"), name)

    def _call_with_kwargs(raw_fn, extra_kwargs, *args, **kwargs):
        return raw_fn(*args, **{**kwargs, **extra_kwargs})

    async def _call_with_kwargs_async(raw_fn, extra_kwargs, *args, **kwargs):
        return await raw_fn(*args, **{**kwargs, **extra_kwargs})

    if not inspect.iscoroutinefunction(raw_fn):
        return partial(_call_with_kwargs, raw_fn, reward_kwargs)
    return partial(_call_with_kwargs_async, raw_fn, reward_kwargs)


def settings(server) -> dict[str, Any]:
    return {"url": server.url, "api_key": KEY, "model": "tiny-brme", "aggregates": "min,uwo", "heads": True}


def extra_info(i: int) -> dict[str, Any]:
    # the dataset's extra_info, plus what verl's naive reward-loop manager adds
    return {"split": "train", "index": i, "prompt": PROMPT, "num_turns": 2, "rollout_reward_scores": {}}


def expected(reference, i: int) -> dict[str, float]:
    result, info = reference
    out = {"score": result.rewards[i], "rm_reward": result.rewards[i]}
    out |= {f"rm_{a}": result.aggregates[a][i] for a in ("min", "uwo")}
    out |= {f"rm_head_{n}": v for n, v in zip(info.heads, result.heads[i], strict=True)}
    out |= {f"rm_sigma_{n}": v for n, v in zip(info.heads, result.head_std[i], strict=True)}
    return out


def test_verl_reward_loop_awaits_compute_score_per_rollout(server, reference):
    fn = load_like_verl("compute_score", settings(server))
    assert inspect.iscoroutinefunction(fn)  # what verl's managers check, through the partial

    async def reward_loop() -> list[dict[str, Any]]:
        return await asyncio.gather(
            *(
                fn(data_source="hh", solution_str=r, ground_truth=None, extra_info=extra_info(i))
                for i, r in enumerate(RESPONSES)
            )
        )

    results = run(reward_loop())
    for i, result in enumerate(results):
        assert result == pytest.approx(expected(reference, i), rel=1e-5, abs=1e-5)
    assert len({tuple(r) for r in results}) == 1  # the same keys every row: verl builds its columns so


def test_verl_sync_managers_call_compute_score_sync(server, reference):
    fn = load_like_verl("compute_score_sync", settings(server))
    assert not inspect.iscoroutinefunction(fn)
    # the reward loop runs a sync function in its executor; the legacy batch manager calls it directly
    with ThreadPoolExecutor(4) as pool:
        threaded = list(
            pool.map(
                lambda i: fn(
                    data_source="hh", solution_str=RESPONSES[i], ground_truth=None, extra_info=extra_info(i)
                ),
                range(len(RESPONSES)),
            )
        )
    direct = fn(data_source="hh", solution_str=RESPONSES[0], ground_truth=None, extra_info=extra_info(0))
    close_clients()
    for i, result in enumerate(threaded):
        assert result == pytest.approx(expected(reference, i), rel=1e-5, abs=1e-5)
    assert direct == pytest.approx(expected(reference, 0), rel=1e-5, abs=1e-5)


def test_verl_settings_from_the_environment_and_extra_info(server, reference, monkeypatch):
    monkeypatch.setenv("RMSERVE_URL", server.url)
    monkeypatch.setenv("RMSERVE_API_KEY", KEY)
    monkeypatch.setenv("RMSERVE_MODEL", "tiny-llama")
    info = extra_info(0) | {"rmserve": {"model": "tiny-brme", "reward": "min"}}  # the row's own settings
    result = run(
        compute_score(data_source="hh", solution_str=RESPONSES[0], ground_truth=None, extra_info=info)
    )
    assert result == pytest.approx({"score": reference[0].aggregates["min"][0], "rm_reward": reference[0].aggregates["min"][0]}, abs=1e-5)  # fmt: skip
    # verl's own keywords when it also runs a reward model are accepted and left alone
    plain = run(
        compute_score(
            solution_str=RESPONSES[1], extra_info=extra_info(1), reward_router_address="10.0.0.1:9000",
            reward_model_tokenizer=None,
        )
    )  # fmt: skip
    assert set(plain) == {"score", "rm_reward"}


def test_a_rule_based_score_combines_with_the_reward(server, reference):
    def rule(data_source, solution_str, ground_truth, extra_info):
        return {
            "score": 1.0 if ground_truth in solution_str else 0.0,
            "matched": ground_truth in solution_str,
        }

    fn = partial(make_compute_score(rule=rule, combine=lambda rule_score, rm: rule_score + 0.5 * rm), **settings(server))  # fmt: skip
    hit = run(fn(data_source="hh", solution_str=RESPONSES[3], ground_truth="3 minutes", extra_info=extra_info(3)))  # fmt: skip
    miss = run(fn(data_source="hh", solution_str=RESPONSES[4], ground_truth="3 minutes", extra_info=extra_info(4)))  # fmt: skip
    rewards = reference[0].rewards
    assert hit["score"] == pytest.approx(1.0 + 0.5 * rewards[3], abs=1e-5)
    assert miss["score"] == pytest.approx(0.5 * rewards[4], abs=1e-5)
    assert (hit["rule_score"], hit["rule_matched"], miss["rule_matched"]) == (1.0, True, False)
    assert set(hit) == set(miss)


@pytest.mark.parametrize(
    ("kwargs", "info", "message"),
    [
        ({}, {"prompt": PROMPT}, "no rmserve URL: set RMSERVE_URL"),
        ({"url": "http://x:1"}, {"question": PROMPT}, "extra_info['prompt'] holds no prompt"),
        ({"url": "http://x:1", "colour": "red"}, {"prompt": PROMPT}, "unknown rmserve settings colour"),
        ({"url": "http://x:1", "heads": "maybe"}, {"prompt": PROMPT}, "heads must be true or false"),
    ],
)
def test_verl_settings_errors_say_how_to_fix_them(kwargs, info, message, monkeypatch):
    monkeypatch.delenv("RMSERVE_URL", raising=False)
    with pytest.raises(ValueError, match=re.escape(message)):
        run(compute_score(solution_str="x", extra_info=info, **kwargs))
    assert VerlSettings.resolve({"url": "http://a:1,http://b:2"}, None, {}).urls == [
        "http://a:1",
        "http://b:2",
    ]


async def fetch_rewards_like_openrlhf(http: httpx.AsyncClient, reward_endpoints, queries, prompts, labels):
    """openrlhf/utils/agent.py SingleTurnAgentExecutor._fetch_rewards_via_http (0.11), over httpx."""
    num_servers = len(reward_endpoints)
    batch_size = (len(queries) + num_servers - 1) // num_servers
    tasks = []
    for i, rm in enumerate(reward_endpoints):
        start_idx, end_idx = i * batch_size, min((i + 1) * batch_size, len(queries))
        payload = {"query": queries[start_idx:end_idx], "prompts": prompts[start_idx:end_idx],
                   "labels": labels[start_idx:end_idx]}  # fmt: skip

        async def _post_request(url, data, try_max_times=5):
            for _ in range(try_max_times):
                try:
                    response = await http.post(url, json=data, timeout=180)
                    response.raise_for_status()
                    return response.json()
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(1)
            raise RuntimeError(f"Request error for {try_max_times} times")

        tasks.append(asyncio.create_task(_post_request(rm, payload)))
    return await asyncio.gather(*tasks)


def test_openrlhf_with_two_urls_and_a_key_in_the_path_scores_every_rollout(server, tiny_model_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    queries = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": r}], tokenize=False
        )
        for r in RESPONSES
    ]
    urls = [f"{server.url}/key/{KEY}/get_reward", f"{server.url}/key/{KEY}/get_reward"]

    async def rollouts() -> list[list[dict[str, Any]]]:
        async with httpx.AsyncClient() as http:  # no headers, as OpenRLHF's aiohttp session sends none
            return await asyncio.gather(
                *(fetch_rewards_like_openrlhf(http, urls, [q], [PROMPT], [""]) for q in queries)
            )

    answers = run(rollouts())
    with RewardClient(server.url, api_key=KEY) as client:
        direct = client.score_texts(queries).rewards
    for answer, reward in zip(answers, direct, strict=True):
        info = answer[0]  # the executor reads rewards_info_list[0]
        assert info["rewards"] == info["scores"] == [pytest.approx(reward, abs=1e-5)]
        assert answer[1] == {"rewards": [], "scores": [], "extra_logs": {}}  # the second URL's empty share
    with httpx.Client() as http:
        assert http.post(f"{server.url}/get_reward", json={"query": queries[:1]}).status_code == 401


def test_a_run_is_monitored_listed_and_plotted(server, tmp_path):
    from typer.testing import CliRunner

    from rmserve.cli import app

    fn = partial(compute_score, **settings(server), run="verl-ppo-1")

    async def rollouts() -> list[dict[str, Any]]:
        return await asyncio.gather(
            *(fn(solution_str=r, extra_info=extra_info(i)) for i, r in enumerate(RESPONSES * 2))
        )

    run(rollouts())
    with RewardClient(server.url, api_key=KEY) as client:
        lines = client.runs()
        series = client.run("verl-ppo-1")
    assert lines[0]["id"] == "verl-ppo-1" and lines[0]["models"]["tiny-brme"] == {"inputs": 12, "windows": 3}
    windows = series.models["tiny-brme"]["windows"]
    assert [w["count"] for w in windows] == [4, 4, 4] and all(w["disagreement"] is not None for w in windows)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    out = tmp_path / "run.png"
    result = CliRunner().invoke(
        app,
        [
            "runs",
            "plot",
            "verl-ppo-1",
            "--url",
            server.url,
            "--out",
            str(out),
            "--api-key-file",
            str(key_file),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    listed = CliRunner().invoke(app, ["runs", "list", "--url", server.url, "--api-key-file", str(key_file)])
    assert listed.exit_code == 0 and '"id": "verl-ppo-1"' in listed.output
    missing = CliRunner().invoke(
        app, ["runs", "plot", "nope", "--url", server.url, "--api-key-file", str(key_file)]
    )
    assert missing.exit_code == 2 and "no run 'nope' here" in missing.output
