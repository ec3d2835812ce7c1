"""Input forms and tokenisation: chat templates, the fallback format, BOS handling, truncation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rmserve.models.inputs import (
    INPUT_ADAPTER,
    InputEncoder,
    InputError,
    Message,
    Messages,
    PromptResponse,
    Text,
    TokenIds,
)
from tests.tiny_models import bpe_tokenizer, wordpiece_tokenizer


@pytest.fixture(scope="module")
def chatml():
    return bpe_tokenizer(chat=True, bos=False)


@pytest.fixture(scope="module")
def bos_tok():
    return bpe_tokenizer(chat=False, bos=True)


def encoder(tokenizer, max_length=64, text_pairs=False):
    return InputEncoder(tokenizer, max_length=max_length, vocab_size=len(tokenizer), text_pairs=text_pairs)


def test_prompt_response_uses_the_chat_template_without_extra_special_tokens(chatml):
    enc = encoder(chatml).encode(PromptResponse(prompt="hi", response="hello"))
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>"
    assert enc.token_ids == tuple(chatml(text, add_special_tokens=False).input_ids)
    assert enc.token_ids[-1] == chatml.eos_token_id
    assert enc.truncated is False
    assert enc.token_type_ids is None


def test_messages_equal_apply_chat_template_tokenize_true(chatml):
    turns = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    enc = encoder(chatml).encode(Messages(messages=[Message(**t) for t in turns]))
    expected = chatml.apply_chat_template(turns, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert list(enc.token_ids) == list(expected)


def test_fallback_format_without_a_chat_template(bos_tok):
    e = encoder(bos_tok)
    assert not e.has_chat_template
    messages = [
        Message(role="system", content="s"),
        Message(role="user", content="u"),
        Message(role="assistant", content="a"),
    ]
    assert e.render(messages) == "\n\nSystem: s\n\nHuman: u\n\nAssistant: a"
    enc = e.encode(PromptResponse(prompt="u", response="a"))
    assert enc.token_ids == tuple(bos_tok("\n\nHuman: u\n\nAssistant: a").input_ids)
    assert enc.token_ids[0] == bos_tok.bos_token_id  # special tokens added for the fallback text


def test_text_that_already_starts_with_bos_gets_no_second_bos(bos_tok):
    e = encoder(bos_tok)
    plain = e.encode(Text(text="hello there"))
    prefixed = e.encode(Text(text="<s>hello there"))
    assert plain.token_ids[0] == bos_tok.bos_token_id
    assert plain.token_ids[1] != bos_tok.bos_token_id
    assert prefixed.token_ids == plain.token_ids


def test_text_without_special_tokens_is_tokenized_alone(bos_tok):
    # TRL tokenizes a plain-string prompt + completion with add_special_tokens=False
    e = encoder(bos_tok)
    bare = e.encode(Text(text="hello there", add_special_tokens=False))
    assert bare.token_ids == tuple(bos_tok("hello there", add_special_tokens=False).input_ids)
    assert bare.token_ids[0] != bos_tok.bos_token_id
    assert e.encode(Text(text="hello there", add_special_tokens=True)) == e.encode(Text(text="hello there"))


def test_the_text_form_takes_add_special_tokens_and_nothing_else():
    form = INPUT_ADAPTER.validate_python({"text": "x", "add_special_tokens": False})
    assert form == Text(text="x", add_special_tokens=False)
    with pytest.raises(ValidationError, match='optionally with "add_special_tokens"'):
        INPUT_ADAPTER.validate_python({"text": "x", "add_bos": False})


def test_encoder_text_pairs_for_cross_encoders():
    tok = wordpiece_tokenizer()
    enc = encoder(tok, text_pairs=True).encode(PromptResponse(prompt="how are you", response="fine thanks"))
    expected = tok("how are you", "fine thanks")
    assert list(enc.token_ids) == expected["input_ids"]
    assert list(enc.token_type_ids) == expected["token_type_ids"]
    assert set(enc.token_type_ids) == {0, 1}


def test_token_ids_are_kept_exactly_and_checked_against_the_vocabulary(chatml):
    e = encoder(chatml)
    assert e.encode(TokenIds(input_ids=[3, 1, 4, 1, 5])).token_ids == (3, 1, 4, 1, 5)
    with pytest.raises(
        InputError, match=r"input_ids contains 384, outside this model's vocabulary \[0, 384\)"
    ):
        e.encode(TokenIds(input_ids=[1, 384]))
    with pytest.raises(ValidationError, match="greater than or equal to 0"):  # the schema refuses it (422)
        TokenIds(input_ids=[-1])


def test_truncation_left_keeps_the_end_and_a_leading_special_token(bos_tok):
    e = encoder(bos_tok, max_length=8)
    full = encoder(bos_tok, max_length=1000).encode(
        Text(text="one two three four five six seven eight nine ten")
    )
    assert len(full) > 8 and full.token_ids[0] == bos_tok.bos_token_id
    left = e.encode(Text(text="one two three four five six seven eight nine ten"), "left")
    assert left.truncated is True
    assert left.token_ids == (full.token_ids[0], *full.token_ids[-7:])
    right = e.encode(Text(text="one two three four five six seven eight nine ten"), "right")
    assert right.token_ids == full.token_ids[:8]
    with pytest.raises(InputError, match=rf"the input has {len(full)} tokens, more than max_length=8"):
        e.encode(Text(text="one two three four five six seven eight nine ten"), "error")


def test_truncation_of_token_ids_without_special_start(chatml):
    e = encoder(chatml, max_length=4)
    assert e.encode(TokenIds(input_ids=[10, 11, 12, 13, 14, 15])).token_ids == (12, 13, 14, 15)
    assert e.encode(TokenIds(input_ids=[10, 11, 12, 13])).truncated is False


def test_encode_many_names_the_failing_input(chatml):
    with pytest.raises(InputError, match=r"^inputs\[1\]: input_ids contains 9999"):
        encoder(chatml).encode_many([Text(text="fine"), TokenIds(input_ids=[9999])])


def test_input_forms_are_chosen_by_keys():
    assert isinstance(INPUT_ADAPTER.validate_python({"prompt": "p", "response": "r"}), PromptResponse)
    assert isinstance(
        INPUT_ADAPTER.validate_python({"messages": [{"role": "user", "content": "x"}]}), Messages
    )
    assert isinstance(INPUT_ADAPTER.validate_python({"text": "t"}), Text)
    assert isinstance(INPUT_ADAPTER.validate_python({"input_ids": [1]}), TokenIds)
    for bad in ({"prompt": "p"}, {"text": "t", "prompt": "p"}, {}, "text", {"input_ids": []}):
        with pytest.raises(ValidationError):
            INPUT_ADAPTER.validate_python(bad)


def test_max_length_must_allow_two_tokens(chatml):
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        encoder(chatml, max_length=1)
