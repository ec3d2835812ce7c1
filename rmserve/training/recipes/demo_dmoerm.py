"""The ``demo-dmoerm`` model: DMoERM without its outer layer (one category) on the SmolLM2 demo and HH-RLHF.

Recipe (``rmserve.demo.build.DMOERM_RECIPE``), run by ``rmserve demo build-dmoerm --data HH_FILE`` (never by
the server) and cached where the server finds it:

1. the HH-RLHF harmless-base pairs (whole dialogues) get capability labels from four local labellers,
   as no LLM API is reachable here (``rmserve.training.labelling``): ``harmless`` from a refusal lexicon,
   ``clean`` from a toxicity lexicon, ``fluent`` from the reply's mean log-probability under
   SmolLM2-135M-Instruct as a language model, ``probe`` from the ``demo`` reward model's own preference
   (its frozen probe, shipped with rmserve); each labeller's agreement with the human labels is
   reported on the training pairs and on the held-out pairs;
2. ``train-dmoerm`` on the fixed split's 1,850 training pairs, from the ``demo`` reward model: phase 1
   fine-tunes layers 28-29, the final norm and the head on 60% of them; phase 2 trains one LoRA expert
   per capability (rank 32, alpha 32, q_proj and v_proj of layers 28-29, dropout 0.05); phase 3 the
   MLP on the other 40%; 256 tokens, left truncation, 2 epochs, batches of 8.

It takes about an hour on 2 cores (the layers 0-27 states of every pair are computed once and shared by
every phase). The 462 held-out pairs measure it (``training.json``); ``bench/dmoerm_hh.py`` puts the
figures beside the dense, ensemble and BRME models of ``bench/training_hh.py``, trained on the same split.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rmserve.demo.build import DMOERM_RECIPE, atomic_build, build_demo_model, dmoerm_demo_dir, is_complete
from rmserve.training.dmoerm import DmoermOptions, train_dmoerm
from rmserve.training.hh import load_pairs, split_indices
from rmserve.training.labelling import label_file, report_point
from rmserve.training.lora import LoraSpec
from rmserve.training.ranked import read_ranked, write_records
from rmserve.training.trainer import PrefixMemo

RECIPE = DMOERM_RECIPE
LABELS_REPORT = "labels.json"


def options() -> DmoermOptions:
    """The recipe's training options."""
    r = RECIPE
    return DmoermOptions(
        top=r["top"], epochs=r["epochs"], phase1_share=r["phase1_share"], phase1_lr=r["phase1_lr"],
        expert_lr=r["expert_lr"], lora=LoraSpec(rank=r["lora_rank"], alpha=r["lora_alpha"], dropout=r["lora_dropout"]),
        mlp_epochs=r["mlp_epochs"], mlp_lr=r["mlp_lr"], batch_size=r["batch_size"], max_length=r["max_length"],
        seed=r["seed"], capabilities=tuple(r["labellers"]),
    )  # fmt: skip


def labellers(cache_dir: Path) -> list[tuple[str, str]]:
    """(point, labeller spec) of the recipe, ``reward:demo`` resolved to the demo's folder."""
    demo = build_demo_model(cache_dir, progress=False)
    return [(p, f"reward:{demo}" if s == "reward:demo" else s) for p, s in RECIPE["labellers"].items()]


def build_dmoerm_demo(
    cache_dir: Path,
    data: Path,
    *,
    work: Path | None = None,
    memo: PrefixMemo | None = None,
    progress: bool = True,
) -> Path:
    """The ``demo-dmoerm`` folder, built by ``RECIPE`` from the HH file ``data`` unless cached.

    ``labels.json`` in it: each labeller's agreement on the training and held-out pairs, and the seconds
    the labelling took in the run that finished it (cached verdicts cost nothing).

    Args:
        work: where the labelled data and the labellers' caches go (default: beside the demo, resumable).
        memo: layer states computed earlier for the same inputs (``bench/training_hh.py``'s cache).

    Raises:
        FileNotFoundError: ``data`` does not exist.
    """
    target = dmoerm_demo_dir(cache_dir)
    if is_complete(target):
        return target

    def say(text: str) -> None:
        if progress:
            print(f"[rmserve demo] {text}", file=sys.stderr, flush=True)

    pairs = load_pairs(data)  # a bad file fails before any work
    train_index, held_index = split_indices(len(pairs))
    work = work or target.with_name(target.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    say("building demo-dmoerm (about an hour on 2 cores; resumable) ...")
    items = work / "hh-pairs.jsonl"
    if not items.is_file():
        write_records(items, [{"chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    labelled = work / "hh-labelled.jsonl"
    sources = labellers(cache_dir)
    started = time.monotonic()
    label_file(items, labelled, local=sources, cache_dir=work / "labels-cache", progress=progress, echo=say)
    every = read_ranked(labelled)
    train_items, held_items = [every[i] for i in train_index], [every[i] for i in held_index]
    report: dict[str, Any] = {"label_seconds": round(time.monotonic() - started, 1)}
    report |= {
        split: [report_point(p, s, [i.capabilities.get(p) for i in chosen]).__dict__ for p, s in sources]
        for split, chosen in (("train", train_items), ("held_out", held_items))
    }
    demo = build_demo_model(cache_dir, progress=progress)

    def build(out: Path) -> None:
        train_dmoerm(demo, train_items, held_items, out, options(), progress=progress, echo=say,
                     data_source=str(data), memo=memo)  # fmt: skip
        (out / LABELS_REPORT).write_text(json.dumps(report, indent=2) + "\n")

    return atomic_build(target, build)
