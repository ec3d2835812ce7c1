"""What a branched or DMoERM model costs to serve: the dense demo vs that model on it, with the formula beside.

A branched model of k branches of the top N of L layers runs the trunk once and the top N layers k times:
(L - N + kN) / L of one dense forward, against k for k separate models. A DMoERM model runs the same
path for the k capability experts of each input's routed category, plus its router and MLP. On the same
HH-RLHF dialogues, batched as the server does, each model's whole ``score`` is timed (median of
interleaved runs).

    python bench/branched.py --model ~/.cache/rmserve/training-hh/branched-multihead --out docs/benchmarks.md
    python bench/branched.py --model demo-dmoerm --out docs/benchmarks.md

The branched folder comes from ``bench/training_hh.py`` (or any ``rmserve train-branches`` on the demo);
``demo-dmoerm`` from ``rmserve demo build-dmoerm`` (or give any dmoerm folder on the demo).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from report import interleaved, machine, write_section  # bench/report.py: run as python bench/branched.py

from rmserve.batching.planning import plan_offline
from rmserve.config import LoadOptions, ModelSpec, Settings
from rmserve.models.base import RewardModel
from rmserve.models.branched import BranchedRewardModel, branch_cost
from rmserve.models.dmoerm import DmoermRewardModel
from rmserve.models.inputs import Messages
from rmserve.models.loader import load_model
from rmserve.models.moe import decoder_layers
from rmserve.scoring.loading import resolve_model_path
from rmserve.scoring.registry import resolve_limits
from rmserve.training.hh import default_data_path, load_pairs

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="A branched or dmoerm folder on the demo backbone, or demo-dmoerm."
    )
    parser.add_argument("--dialogues", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    settings = Settings()
    options = LoadOptions(dtype="float32", device="cpu", kernels="reference")
    demo = resolve_model_path(ModelSpec(name="demo", path="demo"), settings.cache_dir)
    path = resolve_model_path(ModelSpec(name="model", path=args.model), settings.cache_dir)
    models: dict[str, RewardModel] = {
        "demo": load_model("demo", demo, options),
        "branched": load_model("branched", path, options),
    }
    branched = models["branched"]
    if isinstance(branched, BranchedRewardModel):
        stacks = branched.branches
    elif isinstance(branched, DmoermRewardModel):
        stacks = branched.stacks[0]  # each input runs its routed category's k experts
    else:
        raise SystemExit(f"{args.model} is a {branched.info.kind} model; give a branched or dmoerm folder.")
    kind = branched.info.kind
    layers = len(branched.trunk_layers) + len(stacks[0].layers)
    top, k = len(stacks[0].layers), len(stacks)
    dialogues = [Messages(messages=p.chosen) for p in load_pairs(default_data_path(ROOT))[: args.dialogues]]
    limits, _, _ = resolve_limits(settings, None, models["demo"].info)
    prepared = {}
    for name, model in models.items():
        encoded = model.new_encoder(args.max_length).encode_many(dialogues, "left")
        prepared[name] = (model, encoded, plan_offline([len(e) for e in encoded], limits))
    times = interleaved(prepared, args.repeats)
    tokens = sum(len(e) for e in prepared["demo"][1])
    ratio, formula = times["branched"] / times["demo"], branch_cost(layers, top, k)
    assert len(decoder_layers(models["demo"].model)) == layers  # type: ignore[attr-defined]
    section = "bench/branched.py" if kind == "branched" else f"bench/branched.py {kind}"
    title = "Branched vs dense" if kind == "branched" else "DMoERM vs dense"
    lines = [
        f"## {title} (`{section}`)",
        "",
        f"Machine: {machine()}. No GPU; float32.",
        "",
        "```",
        f"python bench/branched.py --model {args.model} --dialogues {args.dialogues} --max-length {args.max_length} --repeats {args.repeats}",
        "```",
        "",
        f"{args.dialogues} HH-RLHF dialogues ({tokens} tokens), batched as the server does; median of {args.repeats} "
        f"interleaved runs of each model's whole `score`. {kind}: {branched.info.architecture}.",
        "",
        "| model | seconds | time vs dense | formula (L - N + kN) / L | k separate models |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| demo (dense, {layers} layers) | {times['demo']:.2f} | 1.000x | 1.000x | |",
        f"| {kind} (k = {k}, N = {top}) | {times['branched']:.2f} | {ratio:.3f}x | {formula:.3f}x | {k:.3f}x |",
    ]
    report = "\n".join(lines) + "\n"
    write_section(args.out, section, report)
    print(report)


if __name__ == "__main__":
    main()
