"""HH-RLHF parsing, loading and the fixed train / held-out split."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rmserve.training.hh import (
    DATA_FILE,
    PreferencePair,
    default_data_path,
    dialogue_to_messages,
    load_pairs,
    split_indices,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.unit


def test_dialogue_becomes_exact_messages():
    text = (
        "\n\nHuman: what is 2+2?\n\nAssistant: 4.\n\nHuman:  and 3+3?  "
        "\n\nAssistant: 6, with\n\nblank lines\nkept.\n"
    )
    assert dialogue_to_messages(text) == [
        {"role": "user", "content": "what is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6, with\n\nblank lines\nkept."},
    ]


def test_repeated_speakers_and_empty_turns_are_kept_as_they_are():
    text = "\n\nHuman: hi\n\nHuman: anyone?\n\nAssistant: "
    assert dialogue_to_messages(text) == [
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "anyone?"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize("bad", ["Human: hi\n\nAssistant: hello", "\n\nAssistant: hello", "", "hello"])
def test_a_dialogue_must_start_with_a_human_turn(bad):
    with pytest.raises(ValueError, match=r"starts with '\\n\\nHuman: '"):
        dialogue_to_messages(bad)


def test_split_is_fixed_disjoint_and_complete():
    train, held_out = split_indices(2312)
    assert (len(train), len(held_out)) == (1850, 462)
    assert set(train).isdisjoint(held_out)
    assert sorted(train + held_out) == list(range(2312))
    assert train == sorted(train) and held_out == sorted(held_out)
    assert split_indices(2312) == (train, held_out)
    assert split_indices(2312, seed=1) != (train, held_out)


def test_split_of_any_size_covers_every_index():
    for n in (1, 2, 5, 10, 101):
        train, held_out = split_indices(n, held_out=0.2)
        assert sorted(train + held_out) == list(range(n))
        assert len(held_out) == round(n * 0.2)


def test_load_pairs_reads_plain_and_gzipped_files(tmp_path):
    record = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello",
        "rejected": "\n\nHuman: hi\n\nAssistant: go away",
    }
    expected = PreferencePair(
        chosen=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        rejected=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}],
    )
    plain = tmp_path / "pairs.jsonl"
    plain.write_text(json.dumps(record) + "\n\n" + json.dumps(record) + "\n")
    packed = tmp_path / "pairs.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    assert load_pairs(plain) == [expected, expected]
    assert load_pairs(packed) == [expected]


def test_a_bad_record_names_its_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "oops"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1 "):
        load_pairs(path)


def test_a_missing_file_says_where_the_data_lives(tmp_path):
    with pytest.raises(FileNotFoundError, match="shared/data"):
        load_pairs(tmp_path / "nope.jsonl.gz")


def test_default_data_path_is_beside_the_checkout():
    assert default_data_path(Path("/x/main")) == Path("/x/shared/data") / DATA_FILE


def test_the_shared_file_loads():
    pairs = load_pairs(default_data_path(REPO_ROOT))
    assert len(pairs) == 2312
    assert pairs[0].chosen[:2] == [
        {"role": "user", "content": "what are some pranks with a pen i can do?"},
        {"role": "assistant", "content": "Are you looking for practical joke ideas?"},
    ]
    assert all(p.chosen[0]["role"] == "user" and p.rejected[-1]["role"] == "assistant" for p in pairs)
    assert all(p.chosen[:-1] == p.rejected[:-1] for p in pairs[:100])
