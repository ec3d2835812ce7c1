"""HH-RLHF parsing and the fixed split."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmserve.hh import default_data_path, dialogue_to_messages, load_pairs, split_indices

REPO = Path(__file__).resolve().parents[2]


def test_dialogue_to_messages():
    text = "\n\nHuman: what is 2+2?\n\nAssistant: 4.\n\nHuman: and 3+3?  \n\nAssistant: 6, with\n\nnewlines kept."
    assert dialogue_to_messages(text) == [
        {"role": "user", "content": "what is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6, with\n\nnewlines kept."},
    ]


def test_dialogue_must_start_with_a_human_turn():
    with pytest.raises(ValueError, match="starts with"):
        dialogue_to_messages("Assistant: hi")


def test_split_is_fixed_disjoint_and_complete():
    train, held_out = split_indices(2312)
    assert (len(train), len(held_out)) == (1850, 462)
    assert set(train).isdisjoint(held_out)
    assert sorted(train + held_out) == list(range(2312))
    assert split_indices(2312) == (train, held_out)
    assert split_indices(2312, seed=1) != (train, held_out)


def test_the_shared_file_loads():
    pairs = load_pairs(default_data_path(REPO))
    assert len(pairs) == 2312
    assert all(p.chosen[0]["role"] == "user" and p.chosen[-1]["role"] == "assistant" for p in pairs[:50])
    assert pairs[0].chosen[0]["content"] == "what are some pranks with a pen i can do?"


def test_missing_file_says_where_it_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="shared/data"):
        load_pairs(tmp_path / "nope.jsonl.gz")
