"""Fitting linear reward heads on frozen features, and the statistics of their accuracy.

- ``fit_head``: a bias-free linear reward ``r(h) = w . h`` fitted on feature differences
  ``h_chosen - h_rejected`` by full-batch L-BFGS on per-dimension scaled differences, with an L2
  penalty, under Bradley-Terry (logistic loss) or a margin objective (squared hinge);
- ``select_head``: the objective and L2 strength chosen by pairwise accuracy on a validation slice of
  the training pairs, then refitted on all of them;
- ``pairwise_accuracy`` and ``binomial_interval``: accuracy with its standard error and a 95% Wilson
  interval.

Used by the head trainers (``training.heads``), ``rmserve train`` and the demo recipes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from rmserve.training.hh import split_indices

VALIDATION_SEED = 7
VALIDATION_FRACTION = 0.2
L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
Objective = Literal["bt", "margin"]
OBJECTIVES: tuple[Objective, ...] = ("bt", "margin")
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    """A binomial proportion with its standard error and 95% Wilson interval."""

    value: float
    n: int
    standard_error: float
    low: float
    high: float


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
