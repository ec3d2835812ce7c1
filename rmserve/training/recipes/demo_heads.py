"""Train the heads of the ``demo-brme`` and ``demo-ensemble`` models on HH-RLHF, frozen SmolLM2 backbone.

Both read the same features as the ``demo`` head (``training.demo_head``: the served encoder's
tokens, the last token's hidden state, left truncation to 1,024 tokens, cached by data and backbone
sha256) and use the same train / held-out split (``hh.split_indices``):

- ``demo-brme``: 5 BRME heads (``training.heads.train_brme``, seed 0): mean and sigma per head,
  nominal = smallest sigma per input, served reward ``tradeoff`` (lambda 0.6).
- ``demo-ensemble``: 4 Bradley-Terry heads (``training.heads.train_multihead``, seed 0), each fitted
  on its own random quarter of the train pairs; nominal = head 0, served reward ``mean``.

Writes ``rmserve/assets/demo_brme.{json,safetensors}`` and ``demo_ensemble.{json,safetensors}``: the
descriptor (``rmserve.json``, with the held-out accuracy of every head and aggregate under
``training``) and the heads. ``rmserve.demo.build_head_demo`` turns them into model folders.

Usage::

    rmserve demo train-heads [--data PATH] [--cache-dir DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rmserve.aggregation import AggregationParams
from rmserve.demo.build import (
    ASSETS,
    BACKBONE_DIR,
    DEMO_POOLING,
    build_backbone,
    file_sha256,
    head_model_assets,
)
from rmserve.models.descriptor import DESCRIPTOR
from rmserve.models.heads import HEADS_FILE, save_head_model
from rmserve.names import HeadKind
from rmserve.training.heads import DEFAULT_EPS, format_report
from rmserve.training.hh import SPLIT_SEED, load_pairs, split_indices
from rmserve.training.pipeline import PairFeatures, evaluate, evaluation_record, fit_heads
from rmserve.training.recipes.demo_head import MAX_LENGTH, extract_features, feature_cache_path

SEED = 0
DEMOS: dict[str, tuple[HeadKind, int]] = {  # name: (kind, heads)
    "demo-brme": ("brme", 5),
    "demo-ensemble": ("multihead", 4),
}
PARAMS = AggregationParams()


def train_demo_heads(
    data: Path, cache_dir: Path, assets: Path = ASSETS, *, progress: bool = True
) -> dict[str, dict]:
    """Train both demos' heads and write their assets; returns each demo's held-out record."""
    pairs = load_pairs(data)
    backbone = build_backbone(cache_dir, progress=progress)
    data_sha, backbone_sha = file_sha256(data), file_sha256(backbone / "model.safetensors")
    cache = feature_cache_path(cache_dir, data_sha, backbone_sha)
    dialogues = [d for pair in pairs for d in (pair.chosen, pair.rejected)]
    key = {"data_sha256": data_sha, "backbone_sha256": backbone_sha}
    features, stats = extract_features(backbone, dialogues, cache, cache_key=key, progress=progress)
    chosen, rejected = features[0::2], features[1::2]  # (P, H) each
    train_index, held_index = split_indices(len(pairs))
    train = PairFeatures(chosen[train_index], rejected[train_index], 0, 0, 0.0)
    held = PairFeatures(chosen[held_index], rejected[held_index], 0, 0, 0.0)
    records = {}
    for name, (kind, head_count) in DEMOS.items():
        started = time.monotonic()
        weights = fit_heads(kind, train, heads=head_count, seed=SEED, progress=progress)
        seconds = time.monotonic() - started
        nominal = None if kind == "brme" else 0
        evaluation = evaluate(weights, held, eps=DEFAULT_EPS, nominal_head=nominal, params=PARAMS)
        print(f"{name}: {head_count} {kind} heads trained in {seconds:.1f}s", file=sys.stderr)
        print(format_report(evaluation), file=sys.stderr)
        record = evaluation_record(evaluation)
        descriptor, heads = head_model_assets(name)
        folder = descriptor.parent / f".{name}.build"
        save_head_model(
            folder,
            kind=kind,
            backbone=f"../{BACKBONE_DIR}",
            weights=weights,
            nominal_head=nominal,
            params=PARAMS,
            eps=DEFAULT_EPS,
            pooling=DEMO_POOLING,
            training={
                "data": data.name,
                "data_sha256": data_sha,
                "backbone_sha256": backbone_sha,
                "split_seed": SPLIT_SEED,
                "train_pairs": len(train_index),
                "seed": SEED,
                "max_length": MAX_LENGTH,
                "train_seconds": round(seconds, 1),
                "features": {
                    "dialogues": stats.dialogues,
                    "tokens": stats.tokens,
                    "truncated": stats.truncated,
                },
                "held_out": record,
                "command": "rmserve demo train-heads",
            },
        )
        (folder / DESCRIPTOR).replace(descriptor)
        (folder / HEADS_FILE).replace(heads)
        folder.rmdir()
        for file in (descriptor, heads):
            file.chmod(0o644)
        records[name] = record
    return records
