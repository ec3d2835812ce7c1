"""bfloat16 on the CPU: speed, and agreement with float32, of the two ways rmserve serves it.

- ``--dtype bfloat16``: the weights in bfloat16, every op in bfloat16;
- ``--autocast``: float32 weights, the forward under ``torch.autocast`` in bfloat16 (matmuls in bfloat16,
  norms, softmax and the heads in float32), as ``ServedModel`` runs it.

The demo model scores the held-out HH pairs (``rmserve.training.hh.split_indices``, chat template,
left-truncated to ``rmserve.training.recipes.demo_head.MAX_LENGTH`` tokens) in float32 and both ways, on the
same batches as the server cuts them, the three models round-robin per batch (``bench/quantize.py``'s
harness). Reported: held-out accuracy with its 95% interval, agreement with float32 (same preferred
response per pair; float32 stays the default unless a bfloat16 mode keeps at least 99%), mean and max
absolute reward difference, and tokens per second.

    python bench/cpu_precision.py                # every held-out pair (462); writes docs/benchmarks.md
    python bench/cpu_precision.py --pairs 16     # a quick check: prints the report only
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from quantize import (  # bench/quantize.py: the same harness
    Scored,
    agreement,
    held_out_dialogues,
    score_round_robin,
)
from report import machine, write_section

from rmserve.batching.planning import plan_offline
from rmserve.config import LoadOptions, Settings
from rmserve.demo.build import build_demo
from rmserve.models.base import HeadOutputs
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import EncodedInput
from rmserve.scoring.registry import resolve_limits
from rmserve.training.fitting import binomial_interval
from rmserve.training.hh import default_data_path
from rmserve.training.recipes.demo_head import MAX_LENGTH

ROOT = Path(__file__).resolve().parents[1]
TARGET_AGREEMENT = 0.99


class Autocast(DenseRewardModel):
    """A float32 demo model whose ``score`` runs under bfloat16 autocast, as ``ServedModel`` runs ``--autocast``."""

    def __init__(self, model: DenseRewardModel) -> None:
        self.__dict__.update(model.__dict__)

    def score(self, batch: Sequence[EncodedInput], **kwargs: Any) -> HeadOutputs:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return super().score(batch, **kwargs)


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
    chosen, _, dialogues = held_out_dialogues(args.data, args.pairs)
    folder = build_demo("demo", settings.cache_dir)
    fp32 = DenseRewardModel("demo", folder, LoadOptions(dtype="float32", device="cpu"))
    models = {
        "float32": fp32,
        "--dtype bfloat16": DenseRewardModel("demo", folder, LoadOptions(dtype="bfloat16", device="cpu")),
        "--autocast": Autocast(DenseRewardModel("demo", folder, LoadOptions(dtype="float32", device="cpu"))),
    }
    encoded = fp32.new_encoder(MAX_LENGTH).encode_many(dialogues, "left")
    limits, _, _ = resolve_limits(settings, None, fp32.info)
    batches = plan_offline([len(e) for e in encoded], limits)
    scored = score_round_robin(models, list(encoded), batches)
    tokens = sum(len(e) for e in encoded)
    text = render(scored, pairs=len(chosen), tokens=tokens, batches=len(batches), args=args)
    out = (
        args.out
        if args.out is not None
        else (ROOT / "docs" / "benchmarks.md" if args.pairs is None else None)
    )
    if out is not None:
        write_section(out, "bench/cpu_precision.py", text)
    print(text)


def render(
    scored: dict[str, Scored], *, pairs: int, tokens: int, batches: int, args: argparse.Namespace
) -> str:
    reference = scored["float32"]
    command = "python bench/cpu_precision.py" + (f" --pairs {args.pairs}" if args.pairs is not None else "")
    lines = [
        "## bfloat16 on the CPU (`bench/cpu_precision.py`)",
        "",
        f"Machine: {machine()}. No GPU.",
        "",
        "```",
        command,
        "```",
        "",
        f"The demo model on {pairs} held-out HH-RLHF pairs ({2 * pairs} dialogues, {tokens} tokens, chat template, "
        f"left-truncated to {MAX_LENGTH} tokens), the same {batches} batches for every mode, round-robin per batch. "
        "Agreement: the share of pairs whose preferred response is float32's.",
        "",
        "| mode | held-out accuracy (95% interval) | agreement with float32 | mean abs reward diff | max abs reward diff | tokens/s | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in scored.items():
        wins = int((run.margins() > 0).sum())
        held = binomial_interval(wins, pairs)
        diff = (run.rewards - reference.rewards).abs()
        lines.append(
            f"| {name} | {held.value:.1%} ({held.low:.1%}-{held.high:.1%}) | {agreement(run, reference):.2%} | "
            f"{float(diff.mean()):.4f} | {float(diff.max()):.4f} | {tokens / run.seconds:.0f} | "
            f"{reference.seconds / run.seconds:.2f}x |"
        )
    best = max((n for n in scored if n != "float32"), key=lambda n: agreement(scored[n], reference))
    kept = agreement(scored[best], reference)
    verdict = (
        f"{best} keeps {kept:.2%} of float32's preferences, at least the {TARGET_AGREEMENT:.0%} the default needs."
        if kept >= TARGET_AGREEMENT
        else f"Neither bfloat16 mode keeps {TARGET_AGREEMENT:.0%} of float32's preferences (best: {best}, {kept:.2%}), "
        "so float32 stays the CPU default; both remain options."
    )
    lines += ["", verdict]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
