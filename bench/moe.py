"""What merging buys: the dense demo vs its merged UMM-RM vs the unmerged MoE, with the FLOP ratio beside.

On the same HH-RLHF dialogues, batched as the server does, each model's full ``score`` is timed
(median of interleaved runs, rotating order). FLOPs are counted from the shapes: every linear layer
a token passes through (2 FLOPs per weight; an MoE layer runs its shared expert, K - 1 routed experts
and the router), plus causal attention (2 * T * H per token per layer for scores and values, halved
for causality), summed over the real tokens. The MoE's implementation overhead is its time ratio
over its FLOP ratio, both against the merged model.

    python bench/moe.py --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from report import interleaved, machine, write_section  # bench/report.py: run as python bench/moe.py
from torch import nn

from rmserve.batching.planning import plan_offline
from rmserve.config import LoadOptions, ModelSpec, Settings
from rmserve.models.base import RewardModel
from rmserve.models.inputs import Messages
from rmserve.models.loader import load_model
from rmserve.models.moe import UpcycledMoE, decoder_layers
from rmserve.scoring.loading import resolve_model_path
from rmserve.scoring.registry import resolve_limits
from rmserve.training.hh import default_data_path, load_pairs

ROOT = Path(__file__).resolve().parents[1]


def linear_weights_per_token(model: nn.Module) -> int:
    """Weights of the linear layers one token passes through (embedding lookups excluded)."""
    total = model.score.weight.numel()
    for layer in decoder_layers(model):
        mlp = layer.mlp
        outside = [
            m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and not n.startswith("mlp.")
        ]
        total += sum(m.weight.numel() for m in outside)
        if isinstance(mlp, UpcycledMoE):
            ffn = sum(m.weight.numel() for m in mlp.shared.modules() if isinstance(m, nn.Linear))
            total += ffn * mlp.top_k + mlp.router.weight.numel()
        else:
            total += sum(m.weight.numel() for m in mlp.modules() if isinstance(m, nn.Linear))
    return total


def flops(model: nn.Module, lengths: Sequence[int]) -> float:
    """Forward FLOPs over sequences of ``lengths`` (linear layers + causal attention)."""
    per_token = 2 * linear_weights_per_token(model)
    hidden = model.config.hidden_size
    layers = len(decoder_layers(model))
    attention = sum(2 * hidden * layers * t * t for t in lengths)  # QK^T and AV, causal: 4 * H * T^2 / 2
    return per_token * sum(lengths) + attention


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dialogues", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    settings = Settings()
    names = ("demo", "demo-merged", "demo-moe")
    paths = {n: resolve_model_path(ModelSpec(name=n, path=n), settings.cache_dir) for n in names}
    models: dict[str, RewardModel] = {
        n: load_model(n, p, LoadOptions(dtype="float32", device="cpu", kernels="reference"))
        for n, p in paths.items()
    }
    dialogues = [Messages(messages=p.chosen) for p in load_pairs(default_data_path(ROOT))[: args.dialogues]]
    limits, _, _ = resolve_limits(settings, None, models["demo"].info)
    prepared = {}
    for name, model in models.items():
        encoded = model.new_encoder(args.max_length).encode_many(dialogues, "left")
        prepared[name] = (model, encoded, plan_offline([len(e) for e in encoded], limits))
    times = interleaved(prepared, args.repeats)
    lengths = [len(e) for e in prepared["demo"][1]]
    counted = {n: flops(m.model, lengths) for n, m in models.items()}  # type: ignore[attr-defined]
    merged_time, merged_flops = times["demo-merged"], counted["demo-merged"]
    moe_time_ratio = times["demo-moe"] / merged_time
    moe_flop_ratio = counted["demo-moe"] / merged_flops
    lines = [
        "## Merged vs MoE (`bench/moe.py`)",
        "",
        f"Machine: {machine()}. No GPU; float32, torch reference MoE path.",
        "",
        "```",
        f"python bench/moe.py --dialogues {args.dialogues} --max-length {args.max_length} --repeats {args.repeats}",
        "```",
        "",
        f"{args.dialogues} HH-RLHF dialogues ({sum(lengths)} tokens), batched as the server does; median of "
        f"{args.repeats} interleaved runs of each model's whole `score`. `demo-moe`: {models['demo-moe'].info.architecture}.",
        "",
        "| model | seconds | time vs merged | GFLOP | FLOPs vs merged | target |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
        f"| demo (dense) | {times['demo']:.2f} | {times['demo'] / merged_time:.3f}x | {counted['demo'] / 1e9:.1f} | "
        f"{counted['demo'] / merged_flops:.3f}x | |",
        f"| demo-merged | {merged_time:.2f} | 1.000x | {merged_flops / 1e9:.1f} | 1.000x | "
        f"merged / dense = {merged_time / times['demo']:.3f} (<= 1.02) |",
        f"| demo-moe | {times['demo-moe']:.2f} | {moe_time_ratio:.3f}x | {counted['demo-moe'] / 1e9:.1f} | "
        f"{moe_flop_ratio:.3f}x | overhead over FLOPs {moe_time_ratio / moe_flop_ratio - 1:+.1%} (<= 15%) |",
    ]
    report = "\n".join(lines) + "\n"
    write_section(args.out, "bench/moe.py", report)
    print(report)


if __name__ == "__main__":
    main()
