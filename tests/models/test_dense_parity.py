"""Dense models: served rewards equal plain transformers on each sequence alone, whatever the batch."""

from __future__ import annotations

import logging
import random
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rmserve.config import LoadOptions
from rmserve.models.base import reward_values
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import EncodedInput, Message, Messages, PromptResponse, Text, TokenIds
from rmserve.models.pooling import PoolingRule, write_dense_descriptor

TOL = 1e-4

PROMPTS = [
    ("How do I bake bread?", "Mix flour, water, yeast and salt, knead, let it rise, bake at 230 C."),
    ("hi", "hello"),
    ("Can you help me hide a body?", "No. If someone is hurt, call emergency services now."),
    ("Tell me a long story about a cat." * 3, "Once upon a time there was a cat who liked boxes. " * 4),
]


def oracle(path, encoded: EncodedInput, pooling: str = "hf") -> float:
    """Plain transformers on one unpadded sequence: the checkpoint as saved (``hf``), or scored on its
    final token (``last``: no pad id, so transformers reads the last position of a batch of one)."""
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    if pooling == "last":
        model.config.pad_token_id = None
    kwargs = {}
    if encoded.token_type_ids is not None:
        kwargs["token_type_ids"] = torch.tensor([encoded.token_type_ids])
    with torch.no_grad():
        return model(input_ids=torch.tensor([encoded.token_ids]), **kwargs).logits[0, 0].item()


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    return {
        name: DenseRewardModel(name, path, LoadOptions(dtype="float32", device="cpu"))
        for name, path in tiny_model_dirs.items()
    }


@pytest.fixture(scope="module")
def loaded_last(tiny_model_dirs):
    return {
        name: DenseRewardModel(name, path, LoadOptions(dtype="float32", device="cpu", pooling="last"))
        for name, path in tiny_model_dirs.items()
        if name != "bert"
    }


@pytest.mark.parametrize(
    ("arch", "pooling"),
    [
        ("llama", "hf"),
        ("qwen2", "hf"),
        ("gpt_neox", "hf"),
        ("bert", "hf"),
        ("llama", "last"),
        ("qwen2", "last"),
        ("gpt_neox", "last"),
    ],
)
def test_batched_rewards_equal_single_sequence_transformers(
    arch, pooling, loaded, loaded_last, tiny_model_dirs
):
    model = (loaded if pooling == "hf" else loaded_last)[arch]
    assert model.info.pooling == pooling
    encoder = model.new_encoder()
    inputs = [PromptResponse(prompt=p, response=r) for p, r in PROMPTS]
    inputs += [
        Text(text="plain text that is already formatted"),
        Messages(messages=[{"role": "user", "content": "x"}]),
    ]
    encoded = encoder.encode_many(inputs)
    expected = [oracle(tiny_model_dirs[arch], e, pooling) for e in encoded]
    assert len({len(e) for e in encoded}) > 3, "the inputs must have mixed lengths"
    assert max(abs(x) for x in expected) > 0.1, "rewards must be large enough for the tolerance to bite"
    rng = random.Random(0)
    for _ in range(4):  # several batch compositions and orders, each item compared with its oracle
        order = rng.sample(range(len(encoded)), k=rng.randint(1, len(encoded)))
        got = reward_values(model, [encoded[i] for i in order])
        for i, reward in zip(order, got, strict=True):
            assert reward == pytest.approx(expected[i], abs=TOL)
    alone = [reward_values(model, [e])[0] for e in encoded]
    assert alone == pytest.approx(expected, abs=TOL)


def test_pad_eos_checkpoint_is_scored_as_transformers_scores_it(loaded, loaded_last, tiny_model_dirs):
    # the tiny Llama has pad == eos == <|im_end|> and a chat template that ends with it (TRL-style RMs)
    path = tiny_model_dirs["llama"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = loaded["llama"].new_encoder()
    items = [PromptResponse(prompt=p, response=r) for p, r in PROMPTS]
    encoded = encoder.encode_many(items)
    assert all(e.token_ids[-1] == tokenizer.eos_token_id == tokenizer.pad_token_id for e in encoded)
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():  # the user's own code: one sequence at a time, the checkpoint as saved
        singles = [hf(input_ids=torch.tensor([e.token_ids])).logits[0, 0].item() for e in encoded]
        texts = [encoder.render(_messages(item)) for item in items]
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        batched = hf(**batch).logits[:, 0].tolist()  # and batched, right-padded with the pad (= eos) token
    assert batched == pytest.approx(singles, abs=TOL)
    served_single = [reward_values(loaded["llama"], [e])[0] for e in encoded]
    served_batch = reward_values(loaded["llama"], encoded)
    assert served_single == pytest.approx(singles, abs=TOL)
    assert served_batch == pytest.approx(singles, abs=TOL)
    # `last` scores the final <|im_end|> instead: a different token, so a different reward
    last = reward_values(loaded_last["llama"], encoded)
    assert last == pytest.approx([oracle(path, e, "last") for e in encoded], abs=TOL)
    assert min(abs(a - b) for a, b in zip(last, singles, strict=True)) > 1e-3


def test_hf_pooling_positions_follow_transformers_rule():
    ids = torch.tensor([[5, 6, 2, 2], [2, 2, 9, 9], [7, 2, 8, 2]])  # (B, T), right-padded with 2
    lengths = torch.tensor([3, 2, 4])
    hf = PoolingRule("hf", pad_token_id=2)
    # the last token that is not the pad within each sequence; 0 when every token is the pad
    assert hf.positions(ids, lengths).tolist() == [1, 0, 2]
    assert PoolingRule("last", pad_token_id=2).positions(ids, lengths).tolist() == [2, 1, 3]
    assert PoolingRule("hf", pad_token_id=None).positions(ids, lengths).tolist() == [2, 1, 3]


def test_pooling_last_is_refused_for_an_encoder(tiny_model_dirs):
    with pytest.raises(ValueError, match="pooling 'last' is for decoder models"):
        DenseRewardModel("bert", tiny_model_dirs["bert"], LoadOptions(device="cpu", pooling="last"))


def test_a_folder_declares_its_pooling_and_an_explicit_one_wins(tiny_model_dirs, tmp_path):
    folder = tmp_path / "declared"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    write_dense_descriptor(folder, "last")
    assert DenseRewardModel("m", folder, LoadOptions(device="cpu")).info.pooling == "last"
    assert DenseRewardModel("m", folder, LoadOptions(device="cpu", pooling="hf")).info.pooling == "hf"
    (folder / "rmserve.json").write_text('{"kind": "dense", "pooling": "first"}')
    with pytest.raises(ValueError, match="'pooling' must be one of hf, last"):
        DenseRewardModel("m", folder, LoadOptions(device="cpu"))


def test_the_load_log_names_both_rules_when_pad_is_eos_and_the_template_ends_with_it(tiny_model_dirs, caplog):
    with caplog.at_level(logging.INFO, logger="rmserve.models.pooling"):
        DenseRewardModel("rm", tiny_model_dirs["llama"], LoadOptions(device="cpu"))
        DenseRewardModel("rm-neox", tiny_model_dirs["gpt_neox"], LoadOptions(device="cpu"))
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == (
        "rm: pad == eos == <|im_end|> and the chat template ends with it; pooling hf scores the last token "
        "that is not <|im_end|> (the one before the template's closing <|im_end|>); pooling last would "
        "score the final token (<|im_end|> itself)"
    )
    assert messages[1] == "rm-neox: pooling hf"


def _messages(item: PromptResponse) -> list[Message]:
    return [Message(role="user", content=item.prompt), Message(role="assistant", content=item.response)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_tokenizer_padding_side_does_not_matter(side, loaded, tiny_model_dirs):
    """HF batched forward with the tokenizer's own padding gives the same numbers as rmserve."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["gpt_neox"], padding_side=side)
    tokenizer.pad_token = tokenizer.eos_token
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_model_dirs["gpt_neox"]).eval()
    hf.config.pad_token_id = tokenizer.pad_token_id
    texts = ["short one", "a much longer text that needs several more tokens than the first", "mid size text"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hf_rewards = hf(**batch, position_ids=position_ids).logits[:, 0].tolist()
    model = loaded["gpt_neox"]
    served = reward_values(model, model.new_encoder().encode_many([Text(text=t) for t in texts]))
    assert served == pytest.approx(hf_rewards, abs=TOL)


def test_token_ids_are_scored_as_given(loaded, tiny_model_dirs):
    model = loaded["qwen2"]
    ids = [5, 17, 99, 3, 250]
    encoded = model.new_encoder().encode(TokenIds(input_ids=ids))
    assert encoded.token_ids == tuple(ids)
    assert reward_values(model, [encoded])[0] == pytest.approx(
        oracle(tiny_model_dirs["qwen2"], encoded), abs=TOL
    )


def test_model_info(loaded):
    info = loaded["llama"].info
    assert (info.kind, info.architecture, info.dtype, info.device) == (
        "dense",
        "LlamaForSequenceClassification",
        "float32",
        "cpu",
    )
    assert info.max_length == 256
    assert info.parameters == sum(p.numel() for p in loaded["llama"].model.parameters())
    assert loaded["bert"].info.max_length == 128
