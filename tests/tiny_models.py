"""Tiny random Hugging Face reward models with real tokenizers, built from configs in seconds.

Each builder writes a complete model folder (config, safetensors weights, tokenizer) that
``AutoModelForSequenceClassification`` loads, so tests exercise the real loading path.
The score heads are rescaled so that rewards are of order 1 and a 1e-4 tolerance means something.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPTNeoXConfig,
    GPTNeoXForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

from rmserve.training.hh import dialogue_to_messages

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
VOCAB = 384
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"
)


def corpus(limit: int = 300) -> list[str]:
    """Real dialogue text to train the tiny tokenizers on (falls back to a fixed text)."""
    if DATA.is_file():
        with gzip.open(DATA, "rt") as f:
            return [json.loads(line)["chosen"] for _, line in zip(range(limit), f, strict=False)]
    return ["Human: how do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt."] * 10


def bpe_tokenizer(*, chat: bool, bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer.

    chat=True: ChatML template whose text ends with ``<|im_end|>``, which is also EOS and PAD
    (the pad == eos trap). bos=True: the tokenizer prepends ``<s>`` and has no pad token.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(
        corpus(), trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False)
    )
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>")
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
        )
    if chat:
        fast.chat_template = CHATML
    return fast


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer ([CLS] a [SEP] b [SEP], with token type ids)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        corpus(), trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out: Path, head: str) -> Path:
    with torch.no_grad():
        getattr(model, head).weight.normal_(0.0, 2.0)
        if getattr(getattr(model, head), "bias", None) is not None:
            getattr(model, head).bias.fill_(0.3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# shared by every tiny model: 2 layers, 32 wide, one reward
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_labels=1,
)


def build_llama(out: Path, seed: int = 0) -> Path:
    """Llama with a ChatML tokenizer where pad == eos and the template ends with eos."""
    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer(chat=True, bos=False)
    config = LlamaConfig(
        **TINY, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return _save(LlamaForSequenceClassification(config).eval(), tokenizer, out, "score")


def build_qwen2(out: Path, seed: int = 1) -> Path:
    """Qwen2 with the ChatML tokenizer."""
    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer(chat=True, bos=False)
    config = Qwen2Config(
        **TINY, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id
    )
    return _save(Qwen2ForSequenceClassification(config).eval(), tokenizer, out, "score")


def build_gpt_neox(out: Path, seed: int = 2) -> Path:
    """GPT-NeoX with a BOS-prepending tokenizer, no chat template and no pad token."""
    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer(chat=False, bos=True)
    config = GPTNeoXConfig(
        **TINY, max_position_embeddings=256, bos_token_id=0, eos_token_id=tokenizer.eos_token_id
    )
    config.pad_token_id = None
    return _save(GPTNeoXForSequenceClassification(config).eval(), tokenizer, out, "score")


def build_bert(out: Path, seed: int = 3) -> Path:
    """A BERT cross-encoder (CLS pooling, token type ids)."""
    torch.manual_seed(seed)
    tokenizer = wordpiece_tokenizer()
    config = BertConfig(
        **TINY, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id, initializer_range=0.5
    )
    return _save(BertForSequenceClassification(config).eval(), tokenizer, out, "classifier")


BUILDERS = {"llama": build_llama, "qwen2": build_qwen2, "gpt_neox": build_gpt_neox, "bert": build_bert}


def random_heads(hidden: int, k: int, *, brme: bool, seed: int) -> dict[str, torch.Tensor]:
    """Random head weights: ``weight``, ``bias`` and, for brme, ``std_weight``, ``std_bias``."""
    g = torch.Generator().manual_seed(seed)
    weights = {"weight": torch.randn(k, hidden, generator=g), "bias": torch.randn(k, generator=g)}
    if brme:
        weights |= {
            "std_weight": torch.randn(k, hidden, generator=g) * 0.3,
            "std_bias": torch.randn(k, generator=g),
        }
    return weights


HEAD_MODELS = {
    "multihead": dict(k=5, seed=0, nominal_head=2, eps=1e-6),
    "brme": dict(k=5, seed=1, nominal_head=None, eps=1e-3),
}


def build_head_model(out: Path, backbone: Path, kind: str) -> Path:
    """A multihead (5 heads, nominal head2) or brme (5 heads, eps 1e-3) folder on a tiny backbone."""
    from rmserve.models.heads import save_head_model

    spec = HEAD_MODELS[kind]
    weights = random_heads(TINY["hidden_size"], spec["k"], brme=kind == "brme", seed=spec["seed"])
    return save_head_model(
        out,
        kind=kind,
        backbone=str(backbone),
        weights=weights,
        nominal_head=spec["nominal_head"],
        eps=spec["eps"],
    )


DMOERM_ITEMS = 48
PREFIXES = {
    "cooking": "kitchen oven bread " * 8,
    "pirate": "arr matey ship " * 8,
}  # prompts a router can tell apart


def write_dmoerm_data(out: Path, *, categories: bool) -> Path:
    """HH pairs as prompt/chosen/rejected, labelled for two capabilities; with ``categories``, half of them
    get a category whose prompts' last turn begins with its own words (left truncation keeps them); two ranked lists of three responses too."""
    if not DATA.is_file():
        pytest.skip(f"{DATA} is missing")
    rows = []
    with gzip.open(DATA, "rt") as f:
        for i, line in zip(range(DMOERM_ITEMS), f, strict=False):
            record = json.loads(line)
            chosen, rejected = (dialogue_to_messages(record[k]) for k in ("chosen", "rejected"))
            prompt, good, bad = chosen[:-1], chosen[-1:], rejected[-1:]
            name = ("cooking", "pirate")[i % 2]
            if categories:
                prompt = [*prompt[:-1], {**prompt[-1], "content": PREFIXES[name] + prompt[-1]["content"]}]
            short = len(good[0]["content"]) - len(bad[0]["content"])
            row = {"prompt": prompt, "chosen": good, "rejected": bad}
            row["capabilities"] = {
                "helpful": "chosen" if i % 5 else "rejected",
                "brief": "tie" if short == 0 else ("chosen" if short < 0 else "rejected"),
            }
            if categories:
                row["category"] = name
            rows.append(row)
            if i < 2:
                lists = {
                    "prompt": prompt,
                    "responses": [good, bad, [{"role": "assistant", "content": "No."}]],
                }
                rows.append(lists | ({"category": name} if categories else {}))
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
