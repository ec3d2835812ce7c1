"""``rmserve train-branches``: a ``branched`` model, trained branch by branch on its own share of the pairs.

Each of the k branches starts from the same dense base and is trained by ``training.trainer.fit`` with
``--train top:N`` (its own copy of the top N layers, final norm and score head) or, with a LoRA spec, peft
adapters on those layers plus the head. Branch i sees its own random share of the training pairs (a
``share`` of them, drawn without replacement with seed ``seed + i``, so shares overlap but differ) and its
own order and initialisation (``seed + i``). The layers below the top N are the base's in every branch, so
their output is computed once for all branches (the shared prefix memo).

Heads, per kind:

- ``multihead``: the branch's trained score head, plus an offset that centres its rewards over its
  training responses at 0, so the branches share a zero (as ``train-heads`` does for its heads);
- ``brme``: BRME's two stages per branch. Stage 1 is the branch's Bradley-Terry training; stage 2
  (``training.heads.train_brme`` with one head and the stage-1 head as ``stage_one``) fits the mean
  and sigma heads on the branch's final features with the MSE loss against the stage-1 preference
  probabilities, reparameterised. The mean head becomes the branch's score head (with its offset).

The report gives held-out accuracy per branch and per aggregate (with standard errors), and the output
is a ``branched`` folder (``rmserve.models.branched``) with its training record.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from rmserve.aggregation import AggregationParams
from rmserve.models.branched import (
    BRANCH_WEIGHTS,
    DEFAULT_EPS,
    HEAD_FILE,
    BranchedConfig,
    write_branched_config,
)
from rmserve.models.decoder import config_of
from rmserve.names import HeadKind
from rmserve.training.heads import HeadEvaluation, evaluate_heads, format_report, train_brme
from rmserve.training.pairs import PreferenceExample
from rmserve.training.pipeline import evaluation_record
from rmserve.training.record import data_record, refuse_nonempty, write_record
from rmserve.training.trainer import (
    TRAINED_POOLING,
    Fitted,
    PairData,
    PrefixMemo,
    TrainOptions,
    cache_prefix,
    encode_pairs,
    fit,
    pooled_states,
    top_layers,
    trained_head,
)


@dataclass(frozen=True)
class BranchOptions:
    """What ``train-branches`` adds to ``TrainOptions``: the kind, k, each branch's share, BRME's sigma floor."""

    kind: HeadKind = "multihead"
    branches: int = 4
    share: float = 0.5
    eps: float = DEFAULT_EPS
    params: AggregationParams = field(default_factory=AggregationParams)

    def __post_init__(self) -> None:
        if self.kind not in ("multihead", "brme"):
            raise ValueError(f"--kind must be multihead or brme, got {self.kind!r}.")
        if self.branches < 1:
            raise ValueError(f"--branches must be at least 1, got {self.branches}.")
        if not 0 < self.share <= 1:
            raise ValueError(f"--share must lie in (0, 1], got {self.share}.")


def branch_shares(pairs: int, branches: int, share: float, seed: int) -> list[list[int]]:
    """Each branch's training pairs: ``round(share * pairs)`` drawn without replacement, seed ``seed + i``.

    Raises:
        ValueError: a share would hold no pair.
    """
    size = round(share * pairs)
    if size < 1:
        raise ValueError(
            f"a share of {share} of {pairs} pairs is empty; give more pairs or a larger --share."
        )
    out = []
    for i in range(branches):
        order = torch.randperm(pairs, generator=torch.Generator().manual_seed(seed + i))
        out.append(sorted(order[:size].tolist()))
    return out


@torch.no_grad()
def features(fitted: Fitted, data: PairData, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The fitted model's final hidden states at the scored token: chosen (N, H), rejected (N, H), float32."""
    chosen, rejected = [], []
    for start in range(0, len(data), batch_size):
        indices = list(range(start, min(start + batch_size, len(data))))
        states = pooled_states(
            fitted.model, data, indices, fitted.first_layer, fitted.pad_id
        ).float()  # (2B, H)
        chosen.append(states[: len(indices)])
        rejected.append(states[len(indices) :])
    return torch.cat(chosen), torch.cat(rejected)


def head_linear(model: nn.Module) -> nn.Linear:
    """The score head's ``nn.Linear`` (under LoRA, peft's trained copy inside its wrapper)."""
    head = trained_head(model)
    if isinstance(head, nn.Linear):
        return head
    copies = getattr(head, "modules_to_save", None)
    inner = copies["default"] if isinstance(copies, nn.ModuleDict) and "default" in copies else None
    if not isinstance(inner, nn.Linear):
        raise TypeError(f"cannot find the trained score head inside {type(head).__name__}.")
    return inner


@dataclass
class _BranchResult:
    stage_one_accuracy: float
    eval_chosen: torch.Tensor  # (N, H)
    eval_rejected: torch.Tensor  # (N, H)
    weight: torch.Tensor  # (H,): the score head, after stage 2 for brme
    head: dict[str, torch.Tensor]  # head.safetensors


def train_branch(
    fitted: Fitted, share: Sequence[PreferenceExample], branch: BranchOptions, options: TrainOptions,
    seed: int, memo: PrefixMemo, progress: bool,
) -> _BranchResult:  # fmt: skip
    """Set the branch's heads after its Bradley-Terry training (see the module docstring)."""
    data = encode_pairs(fitted.encoder, share)
    cache_prefix(fitted.model, data, fitted.first_layer, progress, memo)
    train_c, train_r = features(fitted, data)  # (N, H) each
    eval_c, eval_r = features(fitted, fitted.eval_data)
    score = head_linear(fitted.model)
    extra: dict[str, torch.Tensor] = {}
    if branch.kind == "brme":
        stage_one = score.weight.detach().float()[0]  # (H,)
        weights = train_brme(
            train_c, train_r, heads=1, seed=seed, eps=branch.eps, stage_one=stage_one,
            bsr=options.bsr_strength, progress=progress,
        )  # fmt: skip
        with torch.no_grad():
            score.weight.copy_(weights.mean_weight.to(score.weight))
        extra = {"std_weight": weights.std_weight.float(), "std_bias": weights.std_bias.float()}
    with torch.no_grad():
        if score.bias is not None:  # the offset below replaces it
            score.bias.zero_()
    w = score.weight.detach().float()[0]  # (H,)
    centre = -(torch.cat([train_c, train_r]) @ w).mean().reshape(1)  # rewards average 0 on the branch's share
    head = {"bias": centre.contiguous(), **{k: v.contiguous() for k, v in extra.items()}}
    return _BranchResult(fitted.results["held_out_accuracy"], eval_c, eval_r, w, head)


def save_branch(fitted: Fitted, out: Path, head: dict[str, torch.Tensor]) -> None:
    """Write one branch folder: the adapter (lora) or the trained weights (full), and its head."""
    out.mkdir(parents=True, exist_ok=True)
    if fitted.adapter is not None:
        fitted.adapter.save_pretrained(str(out))
    else:
        trained = {name for name, p in fitted.model.named_parameters() if p.requires_grad}
        state = {
            k: v.detach().contiguous().cpu() for k, v in fitted.model.state_dict().items() if k in trained
        }
        save_file(state, out / BRANCH_WEIGHTS, metadata={"format": "pt"})
    save_file(head, out / HEAD_FILE, metadata={"format": "pt"})


def evaluate_branches(results: Sequence[_BranchResult], branch: BranchOptions) -> HeadEvaluation:
    """Held-out accuracy of every branch and every aggregate."""

    def rewards(side: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        mus, sigmas = [], []
        for r in results:
            h = r.eval_chosen if side == "chosen" else r.eval_rejected  # (N, H)
            mus.append(h @ r.weight + r.head["bias"])
            if "std_weight" in r.head:
                sigmas.append(
                    torch.nn.functional.softplus(h @ r.head["std_weight"][0] + r.head["std_bias"])
                    + branch.eps
                )
        return torch.stack(mus, dim=1), (torch.stack(sigmas, dim=1) if sigmas else None)  # (N, k)

    mu_c, sigma_c = rewards("chosen")
    mu_r, sigma_r = rewards("rejected")
    nominal = None if branch.kind == "brme" else 0
    return evaluate_heads(mu_c, mu_r, sigma_c, sigma_r, nominal_head=nominal, params=branch.params)


def train_branches(
    base: Path,
    train_pairs: Sequence[PreferenceExample],
    eval_pairs: Sequence[PreferenceExample],
    out: Path,
    options: TrainOptions,
    branch: BranchOptions,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    data_source: str = "",
    memo: PrefixMemo | None = None,
) -> dict[str, Any]:
    """Train every branch, report, and write the ``branched`` folder ``out`` with its training record.

    ``memo`` shares cached prefix states with other runs on the same base (the branches always share one).

    Raises:
        ValueError: ``--train`` is not ``top:N``, the share is empty, or ``fit`` refuses the options.
    """
    started = time.monotonic()
    top = top_layers(options.trainable)
    if top is None:
        raise ValueError(
            "train-branches gives each branch its own top N layers: use --train top:N (with --lora-rank R "
            f"for LoRA branches), got --train {options.trainable}."
        )
    shares = branch_shares(len(train_pairs), branch.branches, branch.share, options.seed)
    memo = {} if memo is None else memo
    results: list[_BranchResult] = []
    first: Fitted | None = None
    refuse_nonempty(out)
    for i, share in enumerate(shares):
        echo(f"branch {i + 1} of {branch.branches}: {len(share)} pairs")
        pairs = [train_pairs[j] for j in share]
        branch_options = dataclasses.replace(options, seed=options.seed + i)
        fitted = fit(base, pairs, eval_pairs, branch_options, progress=progress, echo=echo, memo=memo)
        result = train_branch(fitted, pairs, branch, options, options.seed + i, memo, progress)
        save_branch(fitted, out / f"branch-{i}", result.head)
        results.append(result)
        first = first or fitted
    assert first is not None
    evaluation = evaluate_branches(results, branch)
    echo(f"held-out ({len(eval_pairs)} pairs):\n{format_report(evaluation)}")
    config = BranchedConfig(
        base=str(base.resolve()),
        trunk_layers=first.first_layer,
        branches=tuple(f"branch-{i}" for i in range(branch.branches)),
        form="lora" if options.lora is not None else "full",
        head_kind=branch.kind,
        nominal_head=None if branch.kind == "brme" else 0,
        uwo_lambda=branch.params.uwo_lambda,
        tradeoff_lambda=branch.params.tradeoff_lambda,
        eps=branch.eps,
        pooling=TRAINED_POOLING,
    )
    first.encoder.tokenizer.save_pretrained(out)
    config_of(first.model).save_pretrained(out)
    write_branched_config(out, config)
    results_record = {
        "stage_one_held_out_accuracy": [r.stage_one_accuracy for r in results],
        "held_out": evaluation_record(evaluation),
        "shares": [len(s) for s in shares],
    }
    data = data_record(train_pairs, eval_pairs, data_source)
    record = write_record(
        out, command="rmserve train-branches", data=data,
        options={"train": options, "branches": branch}, results=results_record, started=started,
    )  # fmt: skip
    echo(f"wrote {out} in {record['seconds']:.0f}s")
    return record
