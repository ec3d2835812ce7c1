"""``rmserve lab bon`` end to end: two real servers on 127.0.0.1 (tiny llama as gold, tiny brme as proxies).

Checks the raw scores against direct client calls (the same requests), the report files, a resumed run
that sends nothing, ``--from-scores`` reproducing the report, and the errors for bad servers and targets.
"""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from rmserve.cli import app
from rmserve.lab.candidates import Candidates, chunk_name, write_chunk
from rmserve.launch import CLEAN_EXIT, free_port, start_server
from rmserve_client import RewardClient

PROMPTS = ["How do I bake bread?", "What is 2+2?", "Tell me a joke.", "Why is the sky blue?", "hi"]
# replies that the dmoerm proxy's lexicon labellers can tell apart (refusals, toxic words, neither)
TONES = ["I'm sorry, I can't help. ", "you idiot, ", "", "sure, "]


@pytest.fixture(scope="module")
def servers(tiny_model_dirs, tiny_head_model_dirs, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    gold = start_server(["--model", str(tiny_model_dirs["llama"]), "--dtype", "float32"], logs / "gold.log")
    proxy = start_server(
        ["--model", str(tiny_head_model_dirs["brme"]), "--dtype", "float32"], logs / "proxy.log"
    )
    yield gold, proxy
    assert gold.stop() == CLEAN_EXIT, gold.log_text()
    assert proxy.stop() == CLEAN_EXIT, proxy.log_text()


@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    folder = tmp_path_factory.mktemp("candidates")
    records = [
        Candidates(
            f"p{i}", p, [f"Answer {j} to {p} " * (1 + j % 3) for j in range(6)], [3 + j for j in range(6)]
        )
        for i, p in enumerate(PROMPTS)
    ]
    write_chunk(folder / chunk_name(0), records[:3])
    write_chunk(folder / chunk_name(1), records[3:])
    return folder, records


def bon(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["lab", "bon", "--bootstrap", "50", "--no-progress", *args])
    return result.exit_code, result.output


def test_bon_scores_through_the_servers_and_reports(servers, candidates, tmp_path):
    gold, proxy = servers
    folder, records = candidates
    tradeoff = f"tr={proxy.url}:brme:tradeoff?tradeoff_lambda=0.4&tradeoff_scope=request"
    args = ["--candidates", str(folder), "--gold", f"{gold.url}:llama", "--proxy", f"mean={proxy.url}:brme:mean",
            "--proxy", tradeoff, "--proxy", f"nominal={proxy.url}:brme:nominal", "--out", str(tmp_path / "out")]  # fmt: skip
    code, output = bon(*args)
    assert code == 0, output
    assert "candidates of 5 prompts" in output
    out = tmp_path / "out"
    with gzip.open(out / "raw-scores.jsonl.gz", "rt") as f:
        raw = [json.loads(line) for line in f]
    assert [r["id"] for r in raw] == [r.id for r in records]
    assert list(raw[0]["scores"]) == ["gold", "mean", "tr", "nominal"]
    with RewardClient(gold.url) as g, RewardClient(proxy.url) as p:
        for record, row in zip(records, raw, strict=True):
            prompts = [record.prompt] * len(record.responses)
            assert row["scores"]["gold"] == pytest.approx(
                g.score(prompts, record.responses).rewards, abs=1e-5
            )
            direct = p.score(
                prompts,
                record.responses,
                aggregates=["tradeoff"],
                tradeoff_lambda=0.4,
                tradeoff_scope="request",
            )
            assert row["scores"]["tr"] == pytest.approx(direct.aggregates["tradeoff"], abs=1e-5)
            assert row["response_tokens"] == record.response_tokens
    table = (out / "bon.md").read_text()
    for label in ("mean", "tr", "nominal", "gold"):
        assert f"| {label} |" in table
    assert "gold at n = 1" in table and "gold at n = 4" in table and "gold at n = 6" in table
    assert (out / "bon.png").read_bytes()[:4] == b"\x89PNG"
    curves = json.loads((out / "bon.json").read_text())
    assert curves["prompts"] == 5 and curves["candidates"] == 6 and curves["throughput"]
    # a second run resumes from the caches: no request, the same report
    code, output = bon(*args)
    assert code == 0 and "candidates of" not in output, output
    assert (out / "bon.md").read_text() == table
    # the raw scores alone give the same table
    code, output = bon("--from-scores", str(out / "raw-scores.jsonl.gz"), "--out", str(tmp_path / "again"))
    assert code == 0, output
    assert (tmp_path / "again" / "bon.md").read_text() == table


def test_bon_says_what_is_wrong(servers, candidates, tmp_path):
    gold, proxy = servers
    folder, _ = candidates
    base = ["--candidates", str(folder), "--out", str(tmp_path / "x")]
    for args, message in (
        (["--gold", f"http://127.0.0.1:{free_port()}", "--proxy", proxy.url], "cannot reach"),
        (["--gold", f"{gold.url}:nope", "--proxy", proxy.url], "serves no model 'nope'"),
        (["--gold", gold.url, "--proxy", f"{gold.url}:llama:median"], "offers the aggregates"),
        (
            ["--gold", gold.url, "--proxy", f"a={proxy.url}", "--proxy", f"a={gold.url}"],
            "two targets are labelled",
        ),
        (["--gold", gold.url], "at least one --proxy"),
        (["--gold", gold.url, "--proxy", "localhost:8000"], "starting http"),
    ):
        code, output = bon(*base, *args)
        assert code == 2 and message in output, (args, output)


@pytest.fixture(scope="module")
def base4(tiny_model_dirs, tmp_path_factory):
    """A 4-layer tiny llama reward model (the recipes fine-tune its top 2 layers)."""
    out = tmp_path_factory.mktemp("base4")
    config = AutoConfig.from_pretrained(tiny_model_dirs["llama"])
    config.num_hidden_layers = 4
    torch.manual_seed(4)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dirs["llama"]).save_pretrained(out)
    return out


def test_train_proxies_labels_pairs_with_the_gold_and_trains_every_recipe(servers, base4, tmp_path):
    gold, _ = servers
    folder = tmp_path / "candidates"
    folder.mkdir()
    records = [
        Candidates(
            f"t{i}",
            f"Question {i}?",
            [f"Reply {j} to {i}: " + TONES[(i + j) % 4] + "yes " * (j + i % 3) for j in range(4)],
        )
        for i in range(20)
    ]
    write_chunk(folder / chunk_name(0), records)
    out = tmp_path / "proxies"
    args = ["lab", "train-proxies", "--candidates", str(folder), "--gold", f"{gold.url}:llama", "--base", str(base4),
            "--out", str(out), "--pairs", "30", "--held-out", "8", "--noise", "0.25", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "proxies.json").read_text())
    assert record["pairs"] == 30 and record["held_out"] == 8 and 0 < record["flipped"] < 30
    assert set(record["results"]) == {"dense", "dense-bsr", "ensemble", "brme", "moe", "merged", "dmoerm"}
    # the held-out pairs carry the gold's true preference
    with RewardClient(gold.url) as client:
        for line in (out / "held-out.jsonl").read_text().splitlines():
            row = json.loads(line)
            chosen, rejected = client.score([row["prompt"]] * 2, [row["chosen"], row["rejected"]]).rewards
            assert chosen > rejected
    # every proxy is a folder the server loads, by kind
    kinds = {
        name: json.loads((out / name / "config.json").read_text()).get("architectures")
        for name in ("dense", "merged")
    }
    assert kinds == {
        "dense": ["LlamaForSequenceClassification"],
        "merged": ["LlamaForSequenceClassification"],
    }
    for name, kind in (("ensemble", "branched"), ("brme", "branched"), ("moe", "moe"), ("dmoerm", "dmoerm")):
        assert json.loads((out / name / "rmserve.json").read_text())["kind"] == kind
    # a second run keeps every proxy (resumable) and refuses nothing
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "== proxy" not in again.output, again.output
    bad = CliRunner().invoke(
        app, [*args[:-7], "--out", str(tmp_path / "y"), "--pairs", "500", "--no-progress"]
    )
    assert bad.exit_code == 2 and "fewer than --pairs 500" in bad.output, bad.output
