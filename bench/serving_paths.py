"""How far rewards move with the serving path: each input alone against batched, packed, split and
prefix-shared forwards of the same inputs, in float32 and in bfloat16.

In float32 every path equals the input scored alone to rounding (the parity tests hold them to 1e-4).
In bfloat16 a matmul's sums depend on what else is in the batch and on how attention is cut, so the
same input's reward moves with the path; this measures by how much, and whether the order of the
responses to one prompt survives (what GRPO and best-of-n use).

Load: GRPO-shaped groups from HH-RLHF (``bench/prefix.py``'s: prompts of 200 to 600 tokens, each with
``--size`` responses of 32 to 128 tokens), scored offline by the demo model on the CPU:

- ``alone``: each input in a batch of its own (the reference);
- ``padded``: each group as one right-padded batch;
- ``packed``: each group as one packed row (``rmserve.models.packing``);
- ``split``: each group in two parts side by side (``--cpu-row-threads 2``, ``rmserve.models.parallel``);
- ``prefix``: each group with its prefix plan (``rmserve.models.prefix``: the prompt computed once).

    python bench/serving_paths.py --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch
from prefix import groups_of  # bench/prefix.py: run as python bench/serving_paths.py
from report import machine, write_section

from rmserve.batching.planning import BatchLimits
from rmserve.batching.prefix import plan_prefixes
from rmserve.config import LoadOptions, ModelSpec, Settings
from rmserve.models.base import lambdas_for
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import INPUT_ADAPTER, EncodedInput
from rmserve.models.packing import Packing
from rmserve.models.parallel import row_threads
from rmserve.names import PREFIX_MIN_TOKENS
from rmserve.scoring.loading import resolve_model_path
from rmserve.training.hh import default_data_path, load_pairs

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("padded", "packed", "split", "prefix")
ONE_ROW = Packing(max_tokens=1 << 20, pair_cost=0.0)  # every group packs into one row
LIMITS = BatchLimits(max_batch_tokens=1 << 20, max_batch_size=1 << 10, max_join_padding=1 << 20)


def rewards(model: DenseRewardModel, group: list[EncodedInput], path: str) -> list[float]:
    """The group's rewards through ``path``."""
    lambdas = lambdas_for(model.info.defaults, len(group))
    model.packing, model.threads = None, None
    if path == "alone":
        return [model.score([x], **lambdas_for(model.info.defaults, 1)).heads[0, 0].item() for x in group]
    plan = None
    if path == "packed":
        model.packing = ONE_ROW
    elif path == "split":
        model.threads = row_threads(2)
    elif path == "prefix":
        plan = plan_prefixes([x.token_ids for x in group], PREFIX_MIN_TOKENS, LIMITS)
        assert plan.groups, "the group's responses must share their prompt"
    return model.score(group, **lambdas, plan=plan).heads[:, 0].tolist()


def compare(reference: list[list[float]], got: list[list[float]]) -> tuple[float, float, float]:
    """Mean and max absolute difference, and the share of within-group orderings kept."""
    diffs = [abs(a - b) for ref, g in zip(reference, got, strict=True) for a, b in zip(ref, g, strict=True)]
    kept = total = 0
    for ref, g in zip(reference, got, strict=True):
        for i, j in itertools.combinations(range(len(ref)), 2):
            if ref[i] != ref[j]:
                total += 1
                kept += (ref[i] > ref[j]) == (g[i] > g[j])
    return statistics.mean(diffs), max(diffs), kept / max(total, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--size", type=int, default=8, help="responses per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    settings = Settings()
    path = resolve_model_path(ModelSpec(name="demo", path="demo"), settings.cache_dir)
    pairs = load_pairs(default_data_path(ROOT))
    rows = []
    for dtype in ("float32", "bfloat16"):
        model = DenseRewardModel("demo", path, LoadOptions(dtype=dtype, device="cpu"))
        encoder = model.new_encoder()
        groups = groups_of(
            encoder, encoder.tokenizer, pairs, groups=args.groups, size=args.size, seed=args.seed
        )
        encoded = [[encoder.encode(INPUT_ADAPTER.validate_python(x)) for x in g] for g in groups]
        print(f"{dtype}: alone ...", file=sys.stderr, flush=True)
        reference = [rewards(model, g, "alone") for g in encoded]
        for name in PATHS:
            print(f"{dtype}: {name} ...", file=sys.stderr, flush=True)
            got = [rewards(model, g, name) for g in encoded]
            rows.append((dtype, name, *compare(reference, got)))
    tokens = sum(len(x) for g in encoded for x in g)
    report = render(args, rows, tokens)
    print(report)
    if args.out:
        write_section(args.out, "bench/serving_paths.py", report)


def render(args, rows, tokens: int) -> str:
    lines = [
        "## Rewards by serving path, float32 and bfloat16 (`bench/serving_paths.py`)",
        "",
        f"Machine: {machine()}. No GPU.",
        "",
        "```",
        f"python bench/serving_paths.py --groups {args.groups} --size {args.size} --seed {args.seed}",
        "```",
        "",
        f"The demo model on the CPU, {args.groups} HH-RLHF prompts of 200 to 600 tokens with {args.size} responses "
        f"of 32 to 128 tokens each ({tokens} tokens). Each path against each input scored alone: mean and max "
        "absolute reward difference, and the share of the orderings of two responses to the same prompt kept.",
        "",
        "| dtype | path | mean abs diff | max abs diff | orderings kept |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for dtype, name, mean, most, kept in rows:
        lines.append(f"| {dtype} | {name} | {mean:.2g} | {most:.2g} | {100 * kept:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
