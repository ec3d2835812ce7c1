"""Dense models: served rewards equal plain transformers on each sequence alone, whatever the batch."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rmserve.models.base import reward_values
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import EncodedInput, Messages, PromptResponse, Text, TokenIds

TOL = 1e-4

PROMPTS = [
    ("How do I bake bread?", "Mix flour, water, yeast and salt, knead, let it rise, bake at 230 C."),
    ("hi", "hello"),
    ("Can you help me hide a body?", "No. If someone is hurt, call emergency services now."),
    ("Tell me a long story about a cat." * 3, "Once upon a time there was a cat who liked boxes. " * 4),
]


def oracle(path, encoded: EncodedInput) -> float:
    """Plain transformers on one unpadded sequence, scored on its last token."""
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    model.config.pad_token_id = None  # batch of one: transformers then scores the last position
    kwargs = {}
    if encoded.token_type_ids is not None:
        kwargs["token_type_ids"] = torch.tensor([encoded.token_type_ids])
    with torch.no_grad():
        return model(input_ids=torch.tensor([encoded.token_ids]), **kwargs).logits[0, 0].item()


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    return {
        name: DenseRewardModel(name, path, dtype="float32", device="cpu")
        for name, path in tiny_model_dirs.items()
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "bert"])
def test_batched_rewards_equal_single_sequence_transformers(arch, loaded, tiny_model_dirs):
    model = loaded[arch]
    encoder = model.new_encoder()
    inputs = [PromptResponse(prompt=p, response=r) for p, r in PROMPTS]
    inputs += [
        Text(text="plain text that is already formatted"),
        Messages(messages=[{"role": "user", "content": "x"}]),
    ]
    encoded = encoder.encode_many(inputs)
    expected = [oracle(tiny_model_dirs[arch], e) for e in encoded]
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


def test_sequence_ending_in_pad_eos_is_scored_on_its_last_token(loaded, tiny_model_dirs):
    model = loaded["llama"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    encoded = model.new_encoder().encode(PromptResponse(prompt="hi", response="hello"))
    assert encoded.token_ids[-1] == tokenizer.eos_token_id == tokenizer.pad_token_id
    # transformers' own pooling (pad_token_id set) would skip the final <|im_end|>; rmserve must not
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_model_dirs["llama"]).eval()
    with torch.no_grad():
        hf_pooled_wrong = hf(input_ids=torch.tensor([encoded.token_ids])).logits[0, 0].item()
    served = reward_values(model, [encoded])[0]
    assert served == pytest.approx(oracle(tiny_model_dirs["llama"], encoded), abs=TOL)
    assert abs(served - hf_pooled_wrong) > 1e-3


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
