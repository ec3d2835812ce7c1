"""The ``demo-moe`` and ``demo-merged`` models: UMM-RM's recipe on the SmolLM2 demo, sized for a 2-core CPU.

Recipe (``rmserve.demo.build.MOE_RECIPE``), run by ``rmserve demo build-moe --data HH_FILE`` (never by the server)
and cached where the server finds it:

1. upcycle the ``demo`` reward model's last 2 decoder layers into 4 experts (shared + 3 normal),
   top-2 (the shared expert + 1 routed), router seed 0;
2. train the experts, routers, final norm and score head (layers 0-27 frozen, their output cached)
   with Bradley-Terry + BSR (1e-3) + load balancing (1e-2) on the first 128 pairs of the HH train
   split, left-truncated to 256 tokens, 2 epochs, AdamW lr 1e-4, batches of 8: ``demo-moe``;
3. merge it back with shared-expert rate 0.5, the merging weights learned on the same pairs (one
   epoch): ``demo-merged``, a plain ``LlamaForSequenceClassification`` folder.

That is a small training run (about four minutes on 2 cores): it shows the pipeline on real weights and
data, not an accuracy gain; ``rmserve demo build-moe --data HH_FILE --evaluate`` measures all
three models on the 462 held-out pairs. Both models are trained on the final token and declare pooling
``last``, as every demo does.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from rmserve.demo.build import MOE_RECIPE, atomic_build, build_demo_model, is_complete, moe_demo_dirs
from rmserve.models.inputs import Messages
from rmserve.models.moe import decoder_layers
from rmserve.names import MOE_DEMOS
from rmserve.training.hh import load_pairs, split_indices
from rmserve.training.merge import merge
from rmserve.training.pairs import PreferenceExample
from rmserve.training.trainer import (
    PairData,
    PrefixMemo,
    TrainOptions,
    accuracy,
    cache_prefix,
    encode_pairs,
    encoder_for,
    load_classifier,
    train,
)
from rmserve.training.upcycle import upcycle

RECIPE = MOE_RECIPE
MOE_NAME, MERGED_NAME = MOE_DEMOS
PROGRESS_PAIRS = 32


def hh_examples(indices: list[int], data: Path) -> list[PreferenceExample]:
    """HH pairs ``indices`` of the file ``data`` as preference examples (whole dialogues as messages)."""
    pairs = load_pairs(data)
    return [
        PreferenceExample(Messages(messages=pairs[i].chosen), Messages(messages=pairs[i].rejected))
        for i in indices
    ]


def build_moe_demos(cache_dir: Path, data: Path, *, progress: bool = True) -> tuple[Path, Path]:
    """Both folders (``demo-moe``, ``demo-merged``), built by ``RECIPE`` from the HH file ``data`` unless cached.

    Raises:
        FileNotFoundError: ``data`` does not exist.
    """
    moe_dir, merged_dir = moe_demo_dirs(cache_dir)
    if is_complete(moe_dir) and is_complete(merged_dir):
        return moe_dir, merged_dir
    say = (
        (lambda text: print(f"[rmserve demo] {text}", file=sys.stderr, flush=True))
        if progress
        else (lambda _: None)
    )
    train_index, held_index = split_indices(len(load_pairs(data)))  # a bad file fails before any work
    say(f"building {MOE_NAME} and {MERGED_NAME} (about four minutes on 2 cores) ...")
    demo = build_demo_model(cache_dir, progress=progress)
    examples = hh_examples(train_index[: RECIPE["train_pairs"]], data)
    progress_pairs = hh_examples(held_index[:PROGRESS_PAIRS], data)  # a glance per epoch; --evaluate: all
    memo: PrefixMemo = {}  # layers 0-27 are the demo's in both runs: their output is computed once

    def build_moe(out: Path) -> None:
        upcycled = out / "upcycled"
        upcycle(demo, upcycled, experts=RECIPE["experts"], top_k=RECIPE["top_k"], last=RECIPE["last_layers"],
                seed=RECIPE["router_seed"])  # fmt: skip
        options = TrainOptions(
            trainable="experts", epochs=RECIPE["epochs"], lr=RECIPE["lr"], batch_size=RECIPE["batch_size"],
            bsr=RECIPE["bsr"], aux=RECIPE["aux"], max_length=RECIPE["max_length"], seed=0,
        )  # fmt: skip
        trained = out / "trained"
        train(upcycled, examples, progress_pairs, trained, options, progress=progress, echo=say, memo=memo)
        for file in trained.iterdir():
            if file.is_file():
                shutil.move(file, out / file.name)
        shutil.rmtree(upcycled)
        shutil.rmtree(trained)

    moe_dir = moe_dir if is_complete(moe_dir) else atomic_build(moe_dir, build_moe)

    def build_merged(out: Path) -> None:
        merge(moe_dir, out, shared_rate=RECIPE["shared_rate"], train_pairs=examples, epochs=RECIPE["merge_epochs"],
              lr=RECIPE["merge_lr"], max_length=RECIPE["max_length"], progress=progress, echo=say, memo=memo)  # fmt: skip

    merged_dir = merged_dir if is_complete(merged_dir) else atomic_build(merged_dir, build_merged)
    say(f"{MOE_NAME} and {MERGED_NAME} ready")
    return moe_dir, merged_dir


def evaluate_moe_demos(
    cache_dir: Path, data: Path, max_length: int = 512, progress: bool = True
) -> dict[str, float]:
    """Held-out pairwise accuracy of demo, demo-moe and demo-merged on the 462 held-out HH pairs."""
    moe_dir, merged_dir = build_moe_demos(cache_dir, data, progress=progress)
    _, held_index = split_indices(len(load_pairs(data)))
    held = hh_examples(held_index, data)
    results = {}
    pairs: PairData | None = None
    for name, folder in (
        ("demo", build_demo_model(cache_dir)),
        (MOE_NAME, moe_dir),
        (MERGED_NAME, merged_dir),
    ):
        model, _ = load_classifier(folder)
        model.eval()
        first = len(decoder_layers(model)) - RECIPE["last_layers"]
        if pairs is None:  # layers below `first` are the demo's in all three models: cache their output once
            encoder = encoder_for(folder, model, max_length)
            pairs = encode_pairs(encoder, held)
            cache_prefix(model, pairs, first, progress)
        results[name] = accuracy(model, pairs, first, 0, 8)
        print(
            f"{name}: held-out accuracy {results[name]:.4f} ({len(held)} pairs)", file=sys.stderr, flush=True
        )
    return results
