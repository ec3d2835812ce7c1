"""What ``--quantize int8|nf4`` does to the demo model: weight memory, agreement, accuracy and speed.

The demo model (``rmserve.demo.build_demo("demo")``) is loaded three times on the CPU in float32:
unquantised, int8 (LLM.int8) and nf4, through the same ``load_model`` the server uses. Each scores the
held-out HH-RLHF pairs the demo head's accuracy is reported on (``rmserve.hh.split_indices``, chat
template, left-truncated to ``rmserve.training.demo_head.MAX_LENGTH`` tokens), encoded once and batched
once as the server batches them (length-sorted, default limits), so every model computes on exactly
the same batches. Batches run round-robin across the models (a rotating order per batch) so that noise
on this shared machine hits all three alike; a warm-up batch per model is not timed.

Reported per model: weight memory (``ModelInfo.weights_bytes``: parameters, buffers and bitsandbytes'
scales / absmax), held-out pairwise accuracy (chosen reward > rejected reward) with its 95% Wilson
interval, agreement with the unquantised model (same preferred response per pair; targets: >= 99% for
int8, >= 97% for nf4), max and mean absolute reward difference, and throughput in tokens/s.

    python bench/quantize.py              # every held-out pair (462), writes its section of docs/benchmarks.md
    python bench/quantize.py --pairs 16   # a quick check: prints the report only

A run on fewer pairs writes the report only when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from report import machine, write_section  # bench/report.py: run as python bench/quantize.py

from rmserve.batching.planning import plan_offline
from rmserve.config import Settings
from rmserve.demo import build_demo
from rmserve.hh import default_data_path, load_pairs, split_indices
from rmserve.models.base import Encoded, module_bytes, reward_values
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import Messages
from rmserve.models.loader import load_model
from rmserve.models.quantize import QUANTIZE_MODES, QuantizeName
from rmserve.serving import resolve_limits
from rmserve.training.demo_head import MAX_LENGTH, binomial_interval

ROOT = Path(__file__).resolve().parents[1]
TARGET_AGREEMENT = {"int8": 0.99, "nf4": 0.97}


def linear_bytes(model: DenseRewardModel) -> int:
    """Memory of the transformer's linear layers (the score head excluded), quantisation state included."""
    return sum(
        module_bytes(m)
        for m in model.model.modules()
        if isinstance(m, torch.nn.Linear) and m is not model.head
    )


@dataclass(frozen=True)
class Scored:
    """One model's rewards on the held-out dialogues (chosen_0, rejected_0, ...) and its compute time."""

    model: DenseRewardModel
    rewards: torch.Tensor  # (2P,) float64
    seconds: float


def score_round_robin(
    models: dict[QuantizeName, DenseRewardModel], encoded: list[Encoded], batches: list[list[int]]
) -> dict[QuantizeName, Scored]:
    """Every model's rewards on ``encoded``, batch by batch, the models' order rotating per batch."""
    names = list(models)
    for name in names:  # warm-up, not timed
        reward_values(models[name], [encoded[i] for i in batches[0]])
    rewards = {name: torch.zeros(len(encoded), dtype=torch.float64) for name in names}
    seconds = dict.fromkeys(names, 0.0)
    for number, batch in enumerate(batches):
        items = [encoded[i] for i in batch]
        for name in names[number % len(names) :] + names[: number % len(names)]:
            start = time.perf_counter()
            values = reward_values(models[name], items)
            seconds[name] += time.perf_counter() - start
            rewards[name][batch] = torch.tensor(values, dtype=torch.float64)
        if (number + 1) % 10 == 0 or number + 1 == len(batches):
            done = ", ".join(f"{n} {seconds[n]:.0f}s" for n in names)
            print(f"batch {number + 1}/{len(batches)}: {done}", file=sys.stderr, flush=True)
    return {name: Scored(models[name], rewards[name], seconds[name]) for name in names}


def report(
    scored: dict[QuantizeName, Scored], *, pairs: int, tokens: int, batches: int, limits: str, command: str
) -> str:
    """The markdown section: one row per model, then the unquantised-vs-quantised comparison."""
    reference = scored["none"].rewards
    embeddings = scored["none"].model.model.get_input_embeddings().weight.numel()
    ref_prefers = reference[0::2] > reference[1::2]  # (P,)
    ref_margins = reference[0::2] - reference[1::2]  # (P,)
    none = scored["none"].model
    ref_bytes, ref_linear = none.info.weights_bytes, linear_bytes(none)
    rows = []
    for name, s in scored.items():
        held = binomial_interval(int((s.rewards[0::2] > s.rewards[1::2]).sum()), pairs)
        diff = (s.rewards - reference).abs()
        agree = float(((s.rewards[0::2] > s.rewards[1::2]) == ref_prefers).double().mean())
        margins = torch.stack([s.rewards[0::2] - s.rewards[1::2], ref_margins])  # (2, P)
        correlation = float(torch.corrcoef(margins)[0, 1])
        target = f">= {TARGET_AGREEMENT[name]:.0%}" if name in TARGET_AGREEMENT else ""
        linear = linear_bytes(s.model)
        rows.append(
            f"| {name} | {s.model.info.weights_bytes / 2**20:.1f} | {ref_bytes / s.model.info.weights_bytes:.2f}x "
            f"| {linear / 2**20:.1f} | {ref_linear / linear:.2f}x "
            f"| {held.value:.4f} [{held.low:.3f}, {held.high:.3f}] | {agree:.2%} | {target} | {correlation:.4f} "
            f"| {float(diff.max()):.4f} | {float(diff.mean()):.4f} | {tokens / s.seconds:.0f} "
            f"| {scored['none'].seconds / s.seconds:.2f}x |"
        )
    spread = statistics.pstdev(reference.tolist())
    lines = [
        "## Weight quantisation (`bench/quantize.py`)",
        "",
        f"Machine: {machine()}. No GPU; float32 model dtype (nf4 computes in float32).",
        "",
        "```",
        command,
        "```",
        "",
        f"The demo model (SmolLM2-135M reward model) loaded unquantised, int8 (LLM.int8) and nf4 through "
        f"bitsandbytes; {pairs} held-out HH-RLHF pairs ({2 * pairs} dialogues, {tokens} tokens, chat "
        f"template, left-truncated to {MAX_LENGTH} tokens), in the same {batches} batches for every model "
        f"({limits}), run round-robin. The unquantised rewards' standard deviation is {spread:.3f}.",
        "",
        "| quantize | weights MiB | smaller by | linear layers MiB | smaller by | held-out accuracy [95% CI] "
        "| same preference as none | agreement target | margin correlation with none | max abs reward diff "
        "| mean abs reward diff | tokens/s | speed vs none |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "Weights: parameters, buffers and bitsandbytes' scales (int8: a float32 scale per output row; nf4: a "
        f"float32 absmax per block of 64 weights). The embeddings ({embeddings / 1e6:.1f}M of the "
        f"{none.info.parameters / 1e6:.1f}M parameters), norms and score head stay float32, so the whole model "
        "shrinks less than its linear layers do. Margin: a pair's chosen reward minus its rejected reward; "
        f"the unquantised margins' mean absolute value is {float(ref_margins.abs().mean()):.4f}, so a reward "
        "change of that size can flip a preference.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pairs", type=int, default=None, help="score the first N held-out pairs (default all)"
    )
    parser.add_argument("--data", type=Path, default=default_data_path(ROOT), help="HH-RLHF JSONL(.gz) file")
    parser.add_argument(
        "--out", type=Path, default=None, help="report file (default docs/benchmarks.md on a full run)"
    )
    args = parser.parse_args(argv)

    settings = Settings()
    pairs = load_pairs(args.data)
    _, held_out = split_indices(len(pairs))
    chosen = held_out if args.pairs is None else held_out[: args.pairs]
    full = len(chosen) == len(held_out)
    dialogues = [Messages(messages=d) for i in chosen for d in (pairs[i].chosen, pairs[i].rejected)]
    folder = build_demo("demo", settings.cache_dir)
    models: dict[QuantizeName, DenseRewardModel] = {}
    for q in QUANTIZE_MODES:
        model = load_model("demo", folder, dtype="float32", device="cpu", quantize=q)
        assert isinstance(model, DenseRewardModel), f"the demo is a dense model, got {model.info.kind}"
        models[q] = model
    encoded = models["none"].new_encoder(MAX_LENGTH).encode_many(dialogues, "left")
    limits, _, _ = resolve_limits(settings, None, models["none"].info)
    batches = plan_offline([len(e) for e in encoded], limits)
    scored = score_round_robin(models, encoded, batches)

    command = "python bench/quantize.py" + ("" if args.pairs is None else f" --pairs {args.pairs}")
    text = report(
        scored,
        pairs=len(chosen),
        tokens=sum(len(e) for e in encoded),
        batches=len(batches),
        limits=f"max_batch_tokens={limits.max_batch_tokens}, max_join_padding={limits.max_join_padding}",
        command=command,
    )
    out = args.out if args.out is not None else (ROOT / "docs" / "benchmarks.md" if full else None)
    if out is not None:
        write_section(out, "bench/quantize.py", text)
    print(text)


if __name__ == "__main__":
    main()
