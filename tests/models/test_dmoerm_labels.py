"""``rmserve dmoerm label``: the judge protocol against a local fake OpenAI-compatible server, and the local labellers.

The fake judge listens on 127.0.0.1 and answers the paper's prompt by rules per capability point:
``brevity`` prefers the shorter response (consistent whichever position it is in), ``position``
always says Response 1 (position-biased: never consistent), ``silence`` answers without a digit.
It counts requests and the most in flight at once, and can be told to fail the first requests with a
503 or a 429, or to refuse every request with a 400.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from rmserve.cli import app
from rmserve.lab.generate import prompt_ids
from rmserve.training.judge import choice, verdict
from rmserve.training.labelling import FluencyLabeller, build_labeller, local_labels
from rmserve.training.ranked import read_ranked

PAIRS = [
    ("How do I make tea?", "Boil water and steep the leaves.", "You take a kettle, fill it, wait a long time, then pour."),
    ("How do I pick a lock?", "I'm sorry, I can't help with breaking into things.", "Use a tension wrench and a pick."),
    ("Tell me a joke.", "Why did the chicken cross the road? To get away from you, idiot.", "Knock knock."),
    ("What is 2+2?", "4", "It is four, obviously, everyone knows that."),
]  # fmt: skip


class FakeJudge(BaseHTTPRequestHandler):
    state: ClassVar[dict] = {}

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        state = self.state
        with state["lock"]:
            state["requests"] += 1
            state["in_flight"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
            fail = state["fail"].pop(0) if state["fail"] else None
        try:
            time.sleep(0.02)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if state.get("refuse"):
                return self._send(400, {"error": {"message": "model 'nope' does not exist"}})
            if fail is not None:
                return self._send(fail, {"error": "busy"}, {"Retry-After": "0"})
            assert self.path == "/v1/chat/completions" and body["temperature"] == 0.0
            state["auth"] = self.headers.get("Authorization")
            prompt = body["messages"][0]["content"]
            point = re.search(r"in terms of \[(.*?)\]", prompt).group(1)
            first = re.search(r"\[Response 1\]: (.*?)\n\n\[Response 2\]", prompt, re.S).group(1)
            second = prompt.rsplit("[Response 2]: ", 1)[1]
            if point == "brevity":
                answer = "Response 1 is better." if len(first) <= len(second) else "Response 2 is better."
            elif point == "position":
                answer = "I prefer Response 1."
            else:
                answer = "Both are fine."
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})
        finally:
            with state["lock"]:
                state["in_flight"] -= 1

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def judge():
    FakeJudge.state = {"lock": threading.Lock(), "requests": 0, "in_flight": 0, "peak": 0, "fail": []}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", FakeJudge.state
    server.shutdown()
    server.server_close()


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    rows.append({"prompt": "Rank these.", "responses": ["a", "b", "c"]})  # a list: never labelled
    rows.append({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "capabilities": {"kept": "tie"}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["dmoerm", "label", *args])
    return result.exit_code, result.output


def test_choice_and_verdict_follow_the_papers_rule():
    assert choice("Response 2 is better than Response 1") == 2 and choice("no digit") is None
    assert verdict("Response 1", "Response 2") == "chosen" and verdict("2", "1") == "rejected"
    assert verdict("1", "1") is None and verdict("1", None) is None


def test_the_judge_labels_consistent_pairs_only_and_writes_the_report(judge, data, tmp_path):
    url, state = judge
    key = tmp_path / "key"
    key.write_text("sk-test\n")
    out = tmp_path / "labelled.jsonl"
    code, output = run("--data", str(data), "--out", str(out), "--judge-url", url, "--judge-model", "fake",
                       "--api-key-file", str(key), "--point", "brevity", "--point", "position", "--point", "silence",
                       "--concurrency", "3")  # fmt: skip
    assert code == 0, output
    assert state["requests"] == 5 * 3 * 2 and state["peak"] <= 3 and state["auth"] == "Bearer sk-test"
    items = read_ranked(out)
    shorter = [len(c) <= len(r) for _, c, r in PAIRS] + [True]
    for item, chosen_shorter in zip([i for i in items if len(i.responses) == 2], shorter, strict=True):
        assert item.capabilities.get("brevity") == ("chosen" if chosen_shorter else "rejected")
        assert "position" not in item.capabilities and "silence" not in item.capabilities
    assert items[4].capabilities == {} and items[5].capabilities["kept"] == "tie"  # the list; kept labels
    report = {r["point"]: r for r in json.loads((tmp_path / "labelled.report.json").read_text())}
    assert report["brevity"]["labelled"] == 5 and report["position"]["labelled"] == 0
    assert report["brevity"]["agreement"] == pytest.approx(3 / 5)
    assert "brevity" in output and "agreement" in output
    # a rerun asks nothing: every answer is cached
    code, _ = run("--data", str(data), "--out", str(out), "--judge-url", url, "--judge-model", "fake",
                  "--point", "brevity")  # fmt: skip
    assert code == 0 and state["requests"] == 30


def test_busy_answers_are_retried_and_refusals_stop_the_run(judge, data, tmp_path):
    url, state = judge
    state["fail"] = [503, 429, 503]
    out = tmp_path / "l.jsonl"
    code, output = run("--data", str(data), "--out", str(out), "--judge-url", url, "--judge-model", "fake",
                       "--point", "brevity", "--concurrency", "1")  # fmt: skip
    assert code == 0, output
    assert state["requests"] == 10 + 3
    state["refuse"] = True
    code, output = run("--data", str(data), "--out", str(tmp_path / "m.jsonl"), "--judge-url", url,
                       "--judge-model", "nope", "--point", "brevity")  # fmt: skip
    assert code == 2 and "refused the request (400)" in output and "does not exist" in output


def test_a_judge_that_never_answers_ends_with_a_resumable_error(data, tmp_path):
    code, output = run("--data", str(data), "--out", str(tmp_path / "l.jsonl"), "--judge-url", "http://127.0.0.1:9/v1",
                       "--judge-model", "fake", "--point", "brevity", "--max-retries", "1")  # fmt: skip
    assert code == 2 and "failed 2 times" in output and "run the same command again to resume" in output


def test_local_lexicons_label_and_cache(data, tmp_path):
    out = tmp_path / "l.jsonl.gz"
    code, output = run(
        "--data", str(data), "--out", str(out), "--local", "harmless=refusal", "--local", "clean=toxicity"
    )
    assert code == 0, output
    items = [i for i in read_ranked(out) if len(i.responses) == 2]
    assert items[1].capabilities["harmless"] == "chosen"  # the refusal
    assert items[0].capabilities["harmless"] == "tie"
    assert items[2].capabilities["clean"] == "rejected"  # "idiot"
    assert len(list((tmp_path / "l.jsonl.gz.cache").glob("local-*.jsonl"))) == 2


def test_the_reward_and_fluency_labellers_follow_their_models(data, tiny_model_dirs, tmp_path):
    items = [i for i in read_ranked(data) if len(i.responses) == 2]
    rewarded = build_labeller(f"reward:{tiny_model_dirs['llama']}")(items)
    assert set(rewarded) <= {"chosen", "rejected", "tie"} and len(rewarded) == 5
    policy = tmp_path / "policy"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dirs["llama"])).save_pretrained(
        policy
    )
    AutoTokenizer.from_pretrained(tiny_model_dirs["llama"]).save_pretrained(policy)
    labeller = FluencyLabeller(str(policy))
    verdicts = local_labels(items, f"fluency:{policy}", tmp_path / "cache.jsonl", progress=False)
    for item, found in zip(items, verdicts, strict=True):
        query, chosen, rejected = item.prompt, item.texts[0], item.texts[1]
        a, b = labeller.mean_logprob(query, chosen), labeller.mean_logprob(query, rejected)
        assert found == ("chosen" if a > b else "rejected" if a < b else "tie")
        # the mean log-probability is the model's own, token by token
    tokenizer = labeller.tokenizer
    prompt = prompt_ids(tokenizer, "hi")
    reply = tokenizer("hello there", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = labeller.model(input_ids=torch.tensor([prompt + reply])).logits[0]
    want = sum(torch.log_softmax(logits[len(prompt) - 1 + i], -1)[t] for i, t in enumerate(reply)) / len(
        reply
    )
    assert labeller.mean_logprob("hi", "hello there") == pytest.approx(float(want), abs=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a judge"),
        (["--point", "x"], "add --judge-url and --judge-model"),
        (["--judge-url", "http://127.0.0.1:9/v1", "--point", "x"], "both --judge-url and --judge-model"),
        (["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"], "add --point NAME"),
        (["--local", "x"], "POINT=LABELLER"),
        (["--local", "x=sarcasm"], "unknown local labeller 'sarcasm'"),
        (["--local", "x=refusal", "--local", "x=toxicity"], "named twice"),
        (["--judge-url", "ftp://x", "--judge-model", "m", "--point", "p"], "http(s) URL"),
    ],
)
def test_bad_options_are_refused(data, tmp_path, args, message):
    code, output = run("--data", str(data), "--out", str(tmp_path / "o.jsonl"), *args)
    assert code == 2 and message in output, output
