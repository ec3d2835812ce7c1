"""Robust aggregation of k reward heads (or ensemble members) into one reward per input.

Pure tensor functions; every aggregate is computed in float32 from the head rewards ``r`` of shape
(B, k) and, for each input, the index of its nominal head:

- ``mean``: mean over heads;
- ``min``: the worst case (WCO);
- ``max``: the best case;
- ``std``: population standard deviation over heads (divides by k);
- ``uwo``: ``mean - uwo_lambda * variance``, with the population variance (divides by k), as in
  DMoERM's uncertainty-weighted optimisation;
- ``nominal``: the nominal head's reward (BRME: the head with the smallest sigma for that input;
  ensembles and multi-head models: a configured head, by default the first);
- ``tradeoff``: ``tradeoff_lambda * nominal + (1 - tradeoff_lambda) * min`` (BRME eq. 7).

With k = 1 every aggregate equals the reward, and ``std`` is 0.

Two request-level forms (``request_aggregates``), applied to one request's inputs after the batch:

- ``tradeoff_scope="request"``: BRME's robust term is ``min_r E[reward]``, the minimum outside the
  expectation. Over the N inputs of one request (one PPO batch), ``k* = argmin_k mean_n r[n, k]``, and
  each input's trade-off is ``lambda * nominal[n] + (1 - lambda) * r[n, k*]``;
- ``sample_seed``: BRME's reward is a sample: every head reward becomes ``mu + a * sigma`` with
  ``a ~ N(0, 1)`` drawn from a generator seeded with the seed (reparameterisation), in input order, and
  every aggregate is computed from the samples (the nominal head stays the smallest sigma).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rmserve.names import AGGREGATES, TradeoffScope


@dataclass(frozen=True)
class AggregationParams:
    """The lambdas of the robust aggregates.

    Raises:
        ValueError: ``uwo_lambda`` is negative or not finite, or ``tradeoff_lambda`` is outside [0, 1].
    """

    uwo_lambda: float = 1.0
    tradeoff_lambda: float = 0.6

    def __post_init__(self) -> None:
        if not math.isfinite(self.uwo_lambda) or self.uwo_lambda < 0:
            raise ValueError(f"uwo_lambda must be a finite number >= 0, got {self.uwo_lambda}.")
        if not math.isfinite(self.tradeoff_lambda) or not 0 <= self.tradeoff_lambda <= 1:
            raise ValueError(f"tradeoff_lambda must lie in [0, 1], got {self.tradeoff_lambda}.")


def brme_nominal_index(head_std: torch.Tensor) -> torch.Tensor:
    """Per input, the head with the smallest sigma (the first of equal ones): (B, k) -> (B,) long."""
    return head_std.argmin(dim=-1)


def aggregate_rows(
    heads: torch.Tensor,
    nominal_index: torch.Tensor,
    uwo_lambda: torch.Tensor,
    tradeoff_lambda: torch.Tensor,
) -> torch.Tensor:
    """Every aggregate of every input, with per-input lambdas (inputs of one batch come from many requests).

    Args:
        heads: head rewards, (B, k).
        nominal_index: each input's nominal head, (B,) long.
        uwo_lambda: each input's UWO lambda, (B,).
        tradeoff_lambda: each input's trade-off lambda, (B,).

    Returns:
        (B, len(AGGREGATES)) float32, columns in ``AGGREGATES`` order.
    """
    r = heads.float()  # (B, k)
    mean = r.mean(dim=-1)  # (B,)
    variance = (r - mean[:, None]).pow(2).mean(dim=-1)  # (B,) population variance
    worst = r.min(dim=-1).values  # (B,)
    nominal = r.gather(-1, nominal_index[:, None].long())[:, 0]  # (B,)
    lam_u = uwo_lambda.float()  # (B,)
    lam_t = tradeoff_lambda.float()  # (B,)
    columns = {
        "mean": mean,
        "min": worst,
        "max": r.max(dim=-1).values,
        "std": variance.sqrt(),
        "uwo": mean - lam_u * variance,
        "nominal": nominal,
        "tradeoff": lam_t * nominal + (1 - lam_t) * worst,
    }
    return torch.stack([columns[name] for name in AGGREGATES], dim=-1)  # (B, 7)


def aggregate(
    heads: torch.Tensor,
    nominal_index: torch.Tensor,
    params: AggregationParams,
    names: tuple[str, ...] = AGGREGATES,
) -> dict[str, torch.Tensor]:
    """Aggregates of head rewards, with one set of lambdas for every input.

    Args:
        heads: head rewards, (B, k).
        nominal_index: each input's nominal head, (B,) long.
        params: the lambdas.
        names: which aggregates to compute (a subset of ``AGGREGATES``).

    Returns:
        Each named aggregate, (B,) float32.

    Raises:
        ValueError: an unknown aggregate name, or shapes that do not match.
    """
    unknown = [n for n in names if n not in AGGREGATES]
    if unknown:
        raise ValueError(f"unknown aggregate {unknown[0]!r}; choose from {', '.join(AGGREGATES)}.")
    if heads.ndim != 2 or nominal_index.shape != heads.shape[:1]:
        raise ValueError(
            f"heads must be (B, k) and nominal_index (B,), got {tuple(heads.shape)} and {tuple(nominal_index.shape)}."
        )
    rows = heads.shape[0]
    table = aggregate_rows(
        heads,
        nominal_index,
        torch.full((rows,), params.uwo_lambda),
        torch.full((rows,), params.tradeoff_lambda),
    )  # (B, 7)
    return {name: table[:, AGGREGATES.index(name)] for name in names}


def request_aggregates(
    heads: torch.Tensor,
    table: torch.Tensor,
    params: AggregationParams,
    *,
    scope: TradeoffScope = "input",
    head_std: torch.Tensor | None = None,
    sample_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's aggregates with the request-level forms (see the module docstring).

    Args:
        heads: the inputs' head rewards (BRME: the means), (N, k).
        table: their per-input aggregates from the forward, (N, len(AGGREGATES)).
        params: the request's lambdas.
        scope: ``input`` (the trade-off's worst case per input) or ``request`` (head k*).
        head_std: the heads' sigmas, (N, k); needed with ``sample_seed``.
        sample_seed: draw the head rewards ``mu + a * sigma`` with this seed; the nominal head of each
            input stays the one with the smallest sigma.

    Returns:
        The head rewards used (the samples when sampling), (N, k) float32, and the aggregates,
        (N, len(AGGREGATES)) float32 in ``AGGREGATES`` order.

    Raises:
        ValueError: sampling without sigmas, or shapes that do not match.
    """
    r = heads.float()  # (N, k)
    table = table.float().clone()  # (N, 7)
    if r.ndim != 2 or table.shape != (r.shape[0], len(AGGREGATES)):
        raise ValueError(f"heads must be (N, k) and table (N, {len(AGGREGATES)}), got {tuple(r.shape)} and {tuple(table.shape)}.")  # fmt: skip
    rows = r.shape[0]
    if sample_seed is not None:
        if head_std is None or head_std.shape != r.shape:
            raise ValueError(
                "sampling rewards needs each head's sigma (a brme model), shaped like the heads."
            )
        generator = torch.Generator().manual_seed(sample_seed)
        noise = torch.randn(r.shape, generator=generator, dtype=torch.float32)  # (N, k)
        r = r + noise.to(r.device) * head_std.float()  # (N, k)
        table = aggregate_rows(
            r,
            brme_nominal_index(head_std),
            torch.full((rows,), params.uwo_lambda),
            torch.full((rows,), params.tradeoff_lambda),
        )  # (N, 7)
    if scope == "request" and rows:
        worst_head = int(r.mean(dim=0).argmin())  # k*: the lowest mean reward over the request
        nominal = table[:, AGGREGATES.index("nominal")]  # (N,)
        lam = params.tradeoff_lambda
        table[:, AGGREGATES.index("tradeoff")] = lam * nominal + (1 - lam) * r[:, worst_head]
    return r, table
