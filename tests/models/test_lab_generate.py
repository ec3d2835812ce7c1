"""``rmserve lab generate``: our decode loop equals transformers' generate, sampling follows the softmax,
and runs are chunked, reproducible and resumable."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from rmserve.cli import app
from rmserve.lab.candidates import read_candidates
from rmserve.lab.generate import decode, load_policy, prompt_ids, sample_tokens


@pytest.fixture(scope="module")
def policy(tiny_model_dirs, tmp_path_factory):
    """A tiny random causal llama with the tiny ChatML tokenizer (pad == eos)."""
    out = tmp_path_factory.mktemp("policy")
    config = AutoConfig.from_pretrained(tiny_model_dirs["llama"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dirs["llama"]).save_pretrained(out)
    return out


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    prompts = ["How do I bake bread?", "hi", "What is the capital of France, and why is it that one?"]
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def test_greedy_decode_equals_transformers_generate_with_left_padding(policy):
    model, tokenizer = load_policy(str(policy), torch.float32)
    rows = [prompt_ids(tokenizer, p) for p in ("hi", "How do I bake bread? Tell me every step.")]
    eos = tokenizer.eos_token_id
    ours = decode(
        model, rows, max_new_tokens=10, eos_id=eos, pad_id=eos, pick=lambda logits: logits.argmax(-1)
    )
    for row, new in zip(rows, ours, strict=True):
        want = model.generate(torch.tensor([row]), do_sample=False, max_new_tokens=10, pad_token_id=eos)
        want = want[0, len(row) :].tolist()
        want = want[: want.index(eos) + 1] if eos in want else want
        assert new == want


def test_sampling_follows_the_softmax_at_the_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(40_000, 1)
    for temperature in (1.0, 0.5):
        draws = sample_tokens(logits, temperature, torch.Generator().manual_seed(0))
        freq = torch.bincount(draws, minlength=5).double() / len(draws)
        want = torch.softmax(logits[0].double() / temperature, -1)
        assert torch.allclose(freq, want, atol=0.01), (freq, want)
        assert freq[4] == 0


def test_generate_writes_reproducible_resumable_chunks(policy, prompts_file, tmp_path):
    def run(out, *extra):
        return CliRunner().invoke(
            app,
            ["lab", "generate", "--prompts", str(prompts_file), "--out", str(out), "--policy", str(policy),
             "--n", "3", "--max-new-tokens", "6", "--batch-rows", "6", "--no-progress", *extra],
        )  # fmt: skip

    first = tmp_path / "a"
    result = run(first)
    assert result.exit_code == 0, result.output
    records = read_candidates(first)
    assert [r.id for r in records] == ["p0", "p1", "p2"]
    assert sorted(p.name for p in first.glob("chunk-*")) == ["chunk-00000.jsonl.gz", "chunk-00001.jsonl.gz"]
    for r in records:
        assert len(r.responses) == 3 and all(1 <= t <= 6 for t in r.response_tokens)
        assert all(f == (t < 6) or t == 6 for f, t in zip(r.finished, r.response_tokens, strict=True))
    record = json.loads((first / "generation.json").read_text())
    assert record["tokens"] == sum(sum(r.response_tokens) for r in records) and record["seconds"] > 0
    # a lost chunk is made again, the same
    (first / "chunk-00001.jsonl.gz").unlink()
    assert run(first).exit_code == 0
    assert read_candidates(first) == records
    # the same seed elsewhere gives the same samples; other settings in the same folder are refused
    second = tmp_path / "b"
    assert run(second).exit_code == 0 and read_candidates(second) == records
    refused = run(first, "--seed", "1")
    assert refused.exit_code == 2 and "other settings" in refused.output


def test_generate_refuses_bad_options(policy, prompts_file, tmp_path):
    base = [
        "lab",
        "generate",
        "--prompts",
        str(prompts_file),
        "--out",
        str(tmp_path / "x"),
        "--policy",
        str(policy),
    ]
    for extra, message in (
        (["--n", "0"], "at least 1"),
        (["--temperature", "0"], "--temperature must be above 0"),
        (["--dtype", "float16"], "never float16"),
        (["--policy", str(tmp_path)], "no config.json"),
    ):
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
