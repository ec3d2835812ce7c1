"""Best-of-n curves: the gold reward of the proxy's pick, with the unbiased estimator over n-subsets.

For one prompt with N candidates, proxy scores s and gold rewards g, best-of-n picks the candidate the
proxy scores highest among n drawn uniformly without replacement. Sorting the candidates by s (ascending),
the one of rank i (1-based) is the pick of a random n-subset with probability C(i - 1, n - 1) / C(N, n)
(Nakano et al., WebGPT, appendix), so the expected gold reward of the pick is sum_i w_i g_(i): exact, no
resampling noise. Candidates the proxy ties share their weight equally (a tie is broken uniformly at random).
The same weights give the proxy's own score of its pick and the pick's length.

KL(best-of-n || policy) = log n - (n - 1) / n (Stiennon et al.; Gao et al.). Curves are means over
prompts, with 95% percentile-bootstrap intervals over prompts (seeded).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SEED = 0


def kl_bon(n: int) -> float:
    """KL divergence of best-of-n from the policy, in nats."""
    return math.log(n) - (n - 1) / n


def n_grid(count: int) -> list[int]:
    """1, 2, 4, ... up to ``count`` (and ``count`` itself when it is not a power of two)."""
    grid = [1]
    while grid[-1] * 2 <= count:
        grid.append(grid[-1] * 2)
    if grid[-1] != count:
        grid.append(count)
    return grid


def pick_weights(proxy: np.ndarray, n: int) -> np.ndarray:
    """Each candidate's probability of being best-of-n's pick under ``proxy`` (ties share equally).

    Args:
        proxy: (N,) proxy scores.
        n: subset size, 1 <= n <= N.

    Returns:
        (N,) probabilities, in the candidates' order, summing to 1.
    """
    count = proxy.shape[0]
    if not 1 <= n <= count:
        raise ValueError(f"n must lie in [1, {count}], got {n}")
    order = np.argsort(proxy, kind="stable")  # (N,) ascending
    # C(i - 1, n - 1) / C(N, n) for ranks i = 1..N, in log space (exact enough for N in the thousands)
    log_w = np.array(
        [_log_comb(i - 1, n - 1) - _log_comb(count, n) if i >= n else -math.inf for i in range(1, count + 1)]
    )
    weights_sorted = np.exp(log_w)  # (N,) by ascending score
    sorted_scores = proxy[order]
    # ties: every member of a run of equal scores gets the run's mean weight
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], count]
    for a, b in zip(starts, ends, strict=True):
        if b - a > 1:
            weights_sorted[a:b] = weights_sorted[a:b].mean()
    weights = np.empty(count)
    weights[order] = weights_sorted
    return weights / weights.sum()


def _log_comb(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


@dataclass(frozen=True)
class Point:
    """One curve point: the mean over prompts and its 95% bootstrap interval."""

    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class Curve:
    """Best-of-n under one proxy: per n, the gold reward, the proxy's own score and the length of the pick."""

    proxy: str
    ns: list[int]
    gold: list[Point]
    proxy_score: list[Point]
    length: list[Point]


def _interval(per_prompt: np.ndarray, resamples: np.ndarray) -> Point:
    means = per_prompt[resamples].mean(axis=1)  # (B,)
    low, high = np.percentile(means, [2.5, 97.5])
    return Point(float(per_prompt.mean()), float(low), float(high))


def bon_curves(
    scores: Sequence[Mapping[str, Sequence[float]]],
    lengths: Sequence[Sequence[float]],
    proxies: Sequence[str],
    gold: str,
    *,
    bootstrap: int = 1000,
    seed: int = BOOTSTRAP_SEED,
) -> list[Curve]:
    """Best-of-n curves of every proxy against ``gold``.

    Args:
        scores: per prompt, label -> the candidates' scores (every label, the same N candidates).
        lengths: per prompt, the candidates' lengths.
        proxies: the labels to pick with (``gold`` may be one of them: the oracle's curve).
        gold: the label whose reward is the truth.
        bootstrap: resamples of the prompts.
        seed: the resampling seed (the same resamples serve every proxy and n).

    Returns:
        One curve a proxy, at n = 1, 2, 4, ... up to N.

    Raises:
        ValueError: prompts hold different numbers of candidates, or a label is missing.
    """
    counts = {len(s[gold]) for s in scores}
    if len(counts) != 1:
        raise ValueError(
            f"every prompt needs the same number of candidates for best-of-n; found {sorted(counts)}"
        )
    count = counts.pop()
    ns = n_grid(count)
    prompts = len(scores)
    resamples = np.random.default_rng(seed).integers(0, prompts, size=(bootstrap, prompts))  # (B, P)
    golds = np.array([s[gold] for s in scores], dtype=np.float64)  # (P, N)
    lens = np.array(lengths, dtype=np.float64)  # (P, N)
    curves = []
    for label in proxies:
        if any(label not in s for s in scores):
            raise ValueError(f"no scores for {label!r}")
        proxy = np.array([s[label] for s in scores], dtype=np.float64)  # (P, N)
        gold_pts, proxy_pts, len_pts = [], [], []
        for n in ns:
            w = np.stack([pick_weights(proxy[p], n) for p in range(prompts)])  # (P, N)
            gold_pts.append(_interval((w * golds).sum(1), resamples))
            proxy_pts.append(_interval((w * proxy).sum(1), resamples))
            len_pts.append(_interval((w * lens).sum(1), resamples))
        curves.append(Curve(label, ns, gold_pts, proxy_pts, len_pts))
    return curves
