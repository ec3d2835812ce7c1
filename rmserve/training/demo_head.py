"""Train the demo model's score head on HH-RLHF preference pairs, with the backbone frozen.

1. Features: each dialogue is encoded exactly as the server encodes ``{"messages": ...}`` (chat template,
   left-truncated to ``max_length``) and the backbone's last-token hidden state is taken, the vector the
   score head reads. Features are cached, and extraction resumes after an interruption.
2. Head: Bradley-Terry (logistic regression without bias on ``f_chosen - f_rejected``) with an L2 penalty
   chosen on a validation slice of the training pairs, fitted by full-batch L-BFGS on per-dimension
   scaled features and folded back into one bias-free linear map on the raw hidden state.
3. Report: accuracy on the fixed held-out split (chosen reward > rejected reward) with its standard error.

    python -m rmserve.training.demo_head [--data PATH] [--cache-dir DIR] [--out rmserve/assets/demo_head.safetensors]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from rmserve.demo import HEAD_PATH, build_backbone
from rmserve.hh import SPLIT_SEED, default_data_path, load_pairs, split_indices
from rmserve.models.dense import DenseRewardModel
from rmserve.models.inputs import Messages

REPO = Path(__file__).resolve().parents[2]
MAX_LENGTH = 1024
L2_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1)
SAVE_EVERY = 200


@dataclass(frozen=True)
class HeadReport:
    pairs: int
    train_pairs: int
    held_out_pairs: int
    l2: float
    validation_accuracy: float
    train_accuracy: float
    held_out_accuracy: float
    held_out_standard_error: float
    split_seed: int
    data_sha256: str
    extraction_seconds: float
    command: str


def extract_features(
    model: DenseRewardModel, dialogues: list[list[dict[str, str]]], cache: Path, *, progress: bool = True
) -> torch.Tensor:
    """Last-token hidden states for each dialogue, (N, H) float32; resumes from ``cache``."""
    done: dict[int, torch.Tensor] = torch.load(cache) if cache.is_file() else {}
    encoder = model.new_encoder(MAX_LENGTH)
    todo = [i for i in range(len(dialogues)) if i not in done]
    tokens = 0
    started = time.monotonic()
    with tqdm(todo, desc="features", unit="dlg", disable=not progress) as bar:
        for n, i in enumerate(bar, 1):
            encoded = encoder.encode(Messages(messages=dialogues[i]))
            done[i] = model.pooled_states([encoded])[0]  # one unpadded sequence at a time
            tokens += len(encoded)
            bar.set_postfix(tok_s=f"{tokens / (time.monotonic() - started):.0f}")
            if n % SAVE_EVERY == 0:
                torch.save(done, cache)
    torch.save(done, cache)
    return torch.stack([done[i] for i in range(len(dialogues))])


def fit_bt_head(diffs: torch.Tensor, l2: float) -> torch.Tensor:
    """Bias-free logistic regression on ``diffs`` (N, H) (chosen minus rejected), returning w (H,).

    Minimises ``mean(softplus(-diffs @ w)) + l2 * |w_scaled|^2`` where the penalty applies to the
    weights of per-dimension scaled features; the returned w acts on the raw features.
    """
    scale = diffs.pow(2).mean(0).sqrt().clamp_min(1e-6)  # (H,)
    x = (diffs / scale).double()  # (N, H)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w], lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(x @ w)).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (w.detach() / scale.double()).float()


def pairwise_accuracy(w: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    return ((chosen @ w) > (rejected @ w)).double().mean().item()


def train_demo_head(
    data: Path, cache_dir: Path, out: Path, *, progress: bool = True, command: str = ""
) -> HeadReport:
    """Extract features, pick L2 on validation, fit on the train split, report held-out accuracy, save."""
    pairs = load_pairs(data)
    data_sha = hashlib.sha256(data.read_bytes()).hexdigest()
    backbone = build_backbone(cache_dir, progress=progress)
    model = DenseRewardModel("backbone", backbone, dtype="float32", device="cpu")
    cache = cache_dir / f"demo-head-features-{data_sha[:12]}-{MAX_LENGTH}.pt"
    started = time.monotonic()
    dialogues = [d for pair in pairs for d in (pair.chosen, pair.rejected)]
    features = extract_features(model, dialogues, cache, progress=progress)
    extraction = time.monotonic() - started
    chosen, rejected = features[0::2], features[1::2]  # (N, H) each

    train, held_out = split_indices(len(pairs))
    cut = len(train) - len(train) // 5  # validation: the last fifth of the training pairs
    fit_idx, val_idx = train[:cut], train[cut:]
    diffs = chosen - rejected
    scores = {}
    for l2 in L2_GRID:
        w = fit_bt_head(diffs[fit_idx], l2)
        scores[l2] = pairwise_accuracy(w, chosen[val_idx], rejected[val_idx])
        if progress:
            print(f"l2={l2:g}: validation accuracy {scores[l2]:.4f}", file=sys.stderr)
    best = max(L2_GRID, key=lambda l2: (scores[l2], l2))
    w = fit_bt_head(diffs[train], best)
    acc = pairwise_accuracy(w, chosen[held_out], rejected[held_out])
    report = HeadReport(
        pairs=len(pairs),
        train_pairs=len(train),
        held_out_pairs=len(held_out),
        l2=best,
        validation_accuracy=scores[best],
        train_accuracy=pairwise_accuracy(w, chosen[train], rejected[train]),
        held_out_accuracy=acc,
        held_out_standard_error=math.sqrt(acc * (1 - acc) / len(held_out)),
        split_seed=SPLIT_SEED,
        data_sha256=data_sha,
        extraction_seconds=round(extraction, 1),
        command=command,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"score.weight": w[None, :].contiguous()}, str(out))
    out.with_suffix(".json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=default_data_path(REPO), help="HH-RLHF JSONL(.gz) file")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "rmserve")
    parser.add_argument("--out", type=Path, default=HEAD_PATH)
    args = parser.parse_args(argv)
    command = "python -m rmserve.training.demo_head" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    report = train_demo_head(args.data, args.cache_dir, args.out, command=command)
    print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
