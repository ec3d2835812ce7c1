"""Held-out accuracy on HH-RLHF of models trained on the demo backbone: top-2 fine-tune, LoRA, branched.

On the fixed split of the HH-RLHF harmless-base test file (1,850 train pairs, 462 held out), starting
from the ``demo`` reward model (SmolLM2-135M-Instruct with its frozen-probe head), it trains:

- ``top-2``: ``rmserve train --train top:2`` (layers 28-29, final norm and head; layers 0-27 frozen and
  their output cached);
- ``lora``: ``--lora-rank 16`` on every projection of layers 28-29, plus the head;
- ``branched-multihead`` and ``branched-brme``: ``rmserve train-branches --branches 4 --train top:2``,
  each branch on its own half of the train pairs;

and reports each one's held-out pairwise accuracy with its standard error, next to the frozen probe
(``demo``: epoch 0 of the first run, the same pairs and truncation). Every run shares one cache of the
layer-0..27 states (computed once, saved to ``--cache``), and a finished run is skipped when its
folder has a ``training.json``: a cut-off run resumes where it stopped.

    python bench/training_hh.py --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from report import machine, write_section  # bench/report.py: run as python bench/training_hh.py

from rmserve.config import Settings
from rmserve.demo.build import build_demo_model
from rmserve.training.branches import BranchOptions, train_branches
from rmserve.training.hh import load_pairs, split_indices
from rmserve.training.lora import LoraSpec
from rmserve.training.recipes.demo_moe import hh_examples
from rmserve.training.trainer import PrefixMemo, TrainOptions, train

ROOT = Path(__file__).resolve().parents[1]
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMMON = {"max_length": 256, "batch_size": 8, "seed": 0}
RUNS: dict[str, dict[str, Any]] = {
    "top-2": {"options": TrainOptions(trainable="top:2", epochs=2, lr=1e-4, **COMMON)},
    "lora": {
        "options": TrainOptions(
            trainable="top:2", epochs=2, lr=2e-4, lora=LoraSpec(rank=16, targets=ALL_PROJECTIONS), **COMMON
        )
    },
    "branched-multihead": {
        "options": TrainOptions(trainable="top:2", epochs=2, lr=1e-4, **COMMON),
        "branches": BranchOptions(kind="multihead", branches=4, share=0.5),
    },
    "branched-brme": {
        "options": TrainOptions(trainable="top:2", epochs=2, lr=1e-4, **COMMON),
        "branches": BranchOptions(kind="brme", branches=4, share=0.5),
    },
}


def load_memo(path: Path) -> PrefixMemo:
    if path.is_file():
        print(f"reading cached layer states from {path}", flush=True)
        memo: PrefixMemo = torch.load(path, weights_only=True)
        return memo
    return {}


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run's training record."""
    results = record["results"]
    out: dict[str, Any] = {"seconds": record["seconds"]}
    if "held_out" in results:  # branched
        held = results["held_out"]
        out.update(
            branches=held["heads"], aggregates=held["aggregates"], standard_error=held["standard_error"]
        )
    else:
        history = results["history"]
        out.update(
            probe=history[0]["held_out_accuracy"],
            accuracy=results["held_out_accuracy"],
            standard_error=results["held_out_standard_error"],
            history=[round(h["held_out_accuracy"], 4) for h in history],
        )
    return out


def table(results: dict[str, dict[str, Any]], pairs: int, command: str) -> str:
    probe = next((r["probe"] for r in results.values() if "probe" in r), None)

    def se(p: float) -> float:
        return (p * (1 - p) / pairs) ** 0.5

    typical = se(0.62)
    lines = [
        "## Trained models on HH (`bench/training_hh.py`)",
        "",
        f"Held-out pairwise accuracy on the {pairs} held-out HH pairs ({COMMON['max_length']} tokens, left "
        f"truncation); standard error sqrt(p (1 - p) / n), about {typical:.1%} here, so two models whose "
        f"accuracies differ by less than about {2 * 2**0.5 * typical:.1%} (two standard errors of a "
        "difference) are not told apart.",
        "",
        "| model | held-out accuracy | s.e. | training time |",
        "| --- | --- | --- | --- |",
    ]
    if probe is not None:
        lines.append(f"| `demo` (frozen probe, the starting point) | {probe:.1%} | {se(probe):.1%} | |")
    branched = {n: r for n, r in results.items() if "aggregates" in r}
    for name, r in results.items():
        if name not in branched:
            lines.append(
                f"| {name} | {r['accuracy']:.1%} | {r['standard_error']:.1%} | {r['seconds'] / 60:.1f} min |"
            )
    if branched:
        names = list(next(iter(branched.values()))["aggregates"])
        lines += ["", "| branched model | " + " | ".join(names) + " | branches | training time |",
                  "| --- " * (len(names) + 3) + "|"]  # fmt: skip
        for name, r in branched.items():
            cells = [f"{r['aggregates'][a]:.1%}" for a in names]
            branches = ", ".join(f"{v:.1%}" for v in r["branches"])
            lines.append(
                f"| {name} | " + " | ".join(cells) + f" | {branches} | {r['seconds'] / 60:.1f} min |"
            )
    lines += ["", f"{machine()}; `{command}`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="The HH-RLHF harmless-base test file.")
    parser.add_argument("--work", type=Path, default=None, help="Where the models go (default: the cache).")
    parser.add_argument("--only", nargs="*", default=list(RUNS), help="Runs to do (default: all).")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to write the section into.")
    parser.add_argument(
        "--limit", type=int, default=None, help="Use the first N train and held-out pairs (a smoke test)."
    )
    args = parser.parse_args()
    settings = Settings()
    work = args.work or settings.cache_dir / "training-hh"
    work.mkdir(parents=True, exist_ok=True)
    demo = build_demo_model(settings.cache_dir)
    train_index, held_index = split_indices(len(load_pairs(args.data)))
    train_index, held_index = train_index[: args.limit], held_index[: args.limit]
    train_pairs, held = hh_examples(train_index, args.data), hh_examples(held_index, args.data)
    memo_file = work / "prefix-states.pt"
    memo = load_memo(memo_file)
    results: dict[str, dict[str, Any]] = {}
    for name in args.only:
        out = work / name
        if not (out / "training.json").is_file():
            started = time.monotonic()
            print(f"== {name}", flush=True)
            spec = RUNS[name]
            shutil.rmtree(out, ignore_errors=True)  # a run cut off before its training record starts again
            if "branches" in spec:
                train_branches(
                    demo,
                    train_pairs,
                    held,
                    out,
                    spec["options"],
                    spec["branches"],
                    data_source=str(args.data),
                    memo=memo,
                )
            else:
                train(demo, train_pairs, held, out, spec["options"], memo=memo, data_source=str(args.data))
            print(f"{name}: {time.monotonic() - started:.0f}s", flush=True)
            if memo and not memo_file.is_file():
                torch.save(memo, memo_file)
        results[name] = summary(json.loads((out / "training.json").read_text()))
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    command = "python bench/training_hh.py --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --out docs/benchmarks.md"
    text = table(results, len(held), command)
    print(text)
    if args.out:
        write_section(args.out, "bench/training_hh.py", text)


if __name__ == "__main__":
    main()
