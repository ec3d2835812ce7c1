"""Train k reward heads on frozen backbone features: a multi-head Bradley-Terry model and BRME.

This module owns two things, all on pooled features ``h`` (one vector per dialogue, shape (H,)):

1. Training heads on feature tensors ``chosen`` (N, H) and ``rejected`` (N, H), row i being pair i:

   - ``train_multihead``: k linear Bradley-Terry heads ``r_j(h) = w_j . h + b_j``. The pairs are split
     at random into k disjoint shares of ``floor(N/k)`` or ``ceil(N/k)`` pairs (``partition_pairs``,
     as BRME's appendix B.2 assigns each data point to one head), and head j is fitted on share j
     alone by full-batch L-BFGS with an L2 penalty (``demo_head.fit_head``). Bradley-Terry leaves
     each head's offset free; ``b_j`` is set so that head j's mean reward over every training
     response (chosen and rejected) is 0, which puts the heads on a common zero for min/mean.
   - ``train_brme``: Bayesian Reward Model Ensembles (BRME paper, section 5.1 and appendix B.1), each
     head a Gaussian ``N(mu_i(h), sigma_i(h)^2)`` with ``mu_i(h) = w_i . h + b_i`` and
     ``sigma_i(h) = softplus(v_i . h + c_i) + eps``; see its docstring for the recipe and the reading
     of eq. 8 used.

2. Scoring features with trained weights (``apply_multihead``, ``apply_brme``) and measuring pairwise
   accuracy of every head and every reward aggregate (``evaluate_heads``, ``format_report``).

Returned weights always act on raw features ``h``: any internal standardisation is folded back.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rmserve.aggregation import AggregationParams, aggregate, brme_nominal_index
from rmserve.names import AGGREGATES, AggregateName
from rmserve.training.fitting import Interval, binomial_interval, fit_head

# Defaults, checked on demo_head's validation slice of the HH train split (never the held-out pairs).
# L2 of a one-head fit on all pairs (BRME stage 1): 0.1, the stronger of the two best Bradley-Terry
# penalties there (demo_head.json: 0.03 and 0.1 tie).
DEFAULT_L2 = 0.1
# L2 of each multihead head: in the mean-loss form a fixed prior is l2 ~ 1/N, and a head sees 1/k of
# the pairs, so about 0.1 * k; on that slice 0.3 did at least as well as 0.03 and 0.1 for k = 4 and 5
# (differences within the slice's ~2.5% standard error).
MULTIHEAD_L2 = 0.3
# alpha 2: for a stage-1 logit margin d near 0, p_hat - 1/2 ~ d / 4, so the stage-2 target margin
# 2 * alpha * (p_hat - 1/2) ~ d: the targets continue the stage-1 rewards (which initialise mu) in
# the linear regime and saturate at +-alpha/2 = +-1 per response for confident pairs.
DEFAULT_ALPHA = 2.0
DEFAULT_EPS = 0.01  # the smallest sigma: 1% of the largest target magnitude alpha / 2
# 20 epochs of Adam at 1e-3, batches of 64: ~600 steps on 1,850 pairs, about a second on 2 CPU cores;
# the heads move off the stage-1 head and sigma falls by about half; 60-100 epochs did no better on
# the validation slice.
DEFAULT_EPOCHS = 20
DEFAULT_LR = 1e-3  # Adam on standardised features
DEFAULT_BATCH_SIZE = 64
SIGMA_INIT_WEIGHT_NORM = 0.1  # expected norm of the sigma heads' initial (standardised) weights

# ----------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class MultiheadWeights:
    """k linear reward heads on raw features: ``r(h) = weight @ h + bias``.

    Attributes:
        weight: (k, H) float32.
        bias: (k,) float32.
    """

    weight: torch.Tensor  # (k, H)
    bias: torch.Tensor  # (k,)

    def __post_init__(self) -> None:
        if self.weight.ndim != 2 or self.bias.shape != self.weight.shape[:1]:
            raise ValueError(
                f"weight must be (k, H) and bias (k,), got {tuple(self.weight.shape)} and {tuple(self.bias.shape)}."
            )

    @property
    def heads(self) -> int:
        """How many heads (k)."""
        return self.weight.shape[0]


@dataclass(frozen=True)
class BrmeWeights:
    """k Gaussian reward heads on raw features (BRME).

    ``mu = mean_weight @ h + mean_bias`` and ``sigma = softplus(std_weight @ h + std_bias) + eps``.

    Attributes:
        mean_weight: (k, H) float32.
        mean_bias: (k,) float32.
        std_weight: (k, H) float32.
        std_bias: (k,) float32.
        eps: the floor of sigma (> 0).
    """

    mean_weight: torch.Tensor  # (k, H)
    mean_bias: torch.Tensor  # (k,)
    std_weight: torch.Tensor  # (k, H)
    std_bias: torch.Tensor  # (k,)
    eps: float

    def __post_init__(self) -> None:
        k_h = tuple(self.mean_weight.shape)
        shapes = [tuple(t.shape) for t in (self.mean_bias, self.std_weight, self.std_bias)]
        if len(k_h) != 2 or shapes != [k_h[:1], k_h, k_h[:1]]:
            raise ValueError(
                f"mean_weight and std_weight must be (k, H), mean_bias and std_bias (k,), got {k_h} and {shapes}."
            )
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0 so sigma stays positive, got {self.eps}.")

    @property
    def heads(self) -> int:
        """How many heads (k)."""
        return self.mean_weight.shape[0]


def _check_features(features: torch.Tensor, hidden: int) -> None:
    if features.ndim != 2 or features.shape[1] != hidden:
        raise ValueError(f"features must be (N, {hidden}) to match the heads, got {tuple(features.shape)}.")


def apply_multihead(weights: MultiheadWeights, features: torch.Tensor) -> torch.Tensor:
    """Every head's reward of every feature vector: (N, H) -> (N, k) float32."""
    _check_features(features, weights.weight.shape[1])
    return features.float() @ weights.weight.T + weights.bias  # (N, k)


def apply_brme(weights: BrmeWeights, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every BRME head's mean and standard deviation: (N, H) -> (mu (N, k), sigma (N, k)), float32."""
    _check_features(features, weights.mean_weight.shape[1])
    h = features.float()  # (N, H)
    mu = h @ weights.mean_weight.T + weights.mean_bias  # (N, k)
    sigma = F.softplus(h @ weights.std_weight.T + weights.std_bias) + weights.eps  # (N, k)
    return mu, sigma


# ----------------------------------------------------------------------------------------------
# Training


def _check_pairs(chosen: torch.Tensor, rejected: torch.Tensor, heads: int) -> None:
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}.")
    if chosen.ndim != 2 or chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen and rejected must both be (N, H) with row i of each from pair i, got "
            f"{tuple(chosen.shape)} and {tuple(rejected.shape)}."
        )
    if not (chosen.is_floating_point() and rejected.is_floating_point()):
        raise ValueError(f"features must be floating point, got {chosen.dtype} and {rejected.dtype}.")
    if chosen.shape[0] < heads:
        raise ValueError(
            f"{chosen.shape[0]} pairs cannot give each of {heads} heads its own share; use fewer heads or more pairs."
        )
    if not (torch.isfinite(chosen).all() and torch.isfinite(rejected).all()):
        raise ValueError("features contain NaN or infinity; re-extract them or drop those pairs.")


def partition_pairs(n: int, heads: int, generator: torch.Generator) -> torch.Tensor:
    """Assign each of ``n`` pairs to one head at random, every head getting ``floor(n/k)`` or ``ceil(n/k)``.

    Consumes one ``randperm(n)`` of ``generator``.

    Returns:
        Each pair's head, (n,) long.
    """
    order = torch.randperm(n, generator=generator)  # (n,)
    assignment = torch.empty(n, dtype=torch.long)
    assignment[order] = torch.arange(n) % heads  # (n,)
    return assignment


def train_multihead(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    heads: int,
    seed: int,
    l2: float = MULTIHEAD_L2,
    progress: bool = True,
) -> MultiheadWeights:
    """k Bradley-Terry heads, each fitted on its own random share of the pairs.

    Pairs are split by ``partition_pairs`` with ``torch.Generator().manual_seed(seed)`` into k
    disjoint shares (disjoint rather than bootstrap: every pair is used once, and heads differ as
    much as the data allow). Head j is the bias-free L-BFGS fit of ``demo_head.fit_head`` on share j
    (logistic loss of the reward margin, L2 ``l2`` on per-dimension scaled weights). Its bias is then
    ``-mean(w_j . h)`` over all 2N training responses, so every head's mean training reward is 0.

    Args:
        chosen: features of the chosen responses, (N, H).
        rejected: features of the rejected responses, (N, H).
        heads: k >= 1; N >= k.
        seed: seeds the assignment of pairs to heads.
        l2: the L2 penalty of each fit (> 0).
        progress: show a progress bar over heads on stderr.

    Returns:
        The heads on raw features, float32.

    Raises:
        ValueError: bad shapes, ``heads`` < 1, fewer pairs than heads, non-finite features, ``l2`` <= 0.
    """
    _check_pairs(chosen, rejected, heads)
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 to keep separable shares finite, got {l2}.")
    assignment = partition_pairs(chosen.shape[0], heads, torch.Generator().manual_seed(seed))  # (N,)
    diffs = chosen.double() - rejected.double()  # (N, H)
    responses = torch.cat([chosen, rejected]).double()  # (2N, H)
    weight = torch.empty(heads, chosen.shape[1])  # (k, H)
    bias = torch.empty(heads)  # (k,)
    for j in tqdm(range(heads), desc="multihead", unit="head", disable=not progress, file=sys.stderr):
        w = fit_head(diffs[assignment == j], l2, "bt")  # (H,)
        weight[j] = w
        bias[j] = -(responses @ w.double()).mean()  # centres head j's training rewards at 0
    return MultiheadWeights(weight, bias)


def brme_loss(
    mu_c: torch.Tensor,
    sigma_c: torch.Tensor,
    mu_r: torch.Tensor,
    sigma_r: torch.Tensor,
    p_hat: torch.Tensor,
    alpha: float,
    noise_c: torch.Tensor,
    noise_r: torch.Tensor,
) -> torch.Tensor:
    """BRME's eq. 8 per pair, antisymmetric reading: ``(r+ - alpha k)^2 + (r- + alpha k)^2``.

    ``k = p_hat - 1/2`` and the rewards are reparameterised samples ``r+ = mu_c + noise_c * sigma_c``,
    ``r- = mu_r + noise_r * sigma_r``. Eq. 8 as printed gives the rejected response the same target
    ``+alpha k`` as the chosen one, which cannot rank anything; the rejected target here is
    ``-alpha k``. Every argument is (B,) but ``alpha``.

    Returns:
        Each pair's loss, (B,).
    """
    target = alpha * (p_hat - 0.5)  # (B,)
    r_c = mu_c + noise_c * sigma_c  # (B,)
    r_r = mu_r + noise_r * sigma_r  # (B,)
    return (r_c - target).pow(2) + (r_r + target).pow(2)  # (B,)


def _standardiser(responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and scale of (M, H) float64 features; near-constant dimensions keep scale 1."""
    mean = responses.mean(0)  # (H,)
    std = responses.std(0, correction=0)  # (H,)
    scale = torch.where(std > 1e-6 * std.max(), std, torch.ones_like(std))  # (H,)
    return mean, scale


def train_brme(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    heads: int,
    seed: int,
    alpha: float = DEFAULT_ALPHA,
    eps: float = DEFAULT_EPS,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    l2: float = DEFAULT_L2,
    stage_one: torch.Tensor | None = None,
    bsr: float = 0.0,
    progress: bool = True,
) -> BrmeWeights:
    """BRME heads by the paper's two-stage recipe (appendix B.1).

    Stage 1: one Bradley-Terry head ``r1`` on all pairs (``demo_head.fit_head``, L2 ``l2``), or the
    given ``stage_one`` head (a reward model trained beforehand, read on these features);
    ``p_hat = sigmoid(r1(chosen) - r1(rejected))`` per pair.

    Stage 2: pairs are assigned to heads by ``partition_pairs`` (the generator seeded by ``seed``,
    so a multihead model of the same seed uses the same shares). Head i has ``mu_i(h) = w_i . h + b_i``
    and ``sigma_i(h) = softplus(v_i . h + c_i) + eps`` (float32), and minimises ``brme_loss``
    (antisymmetric eq. 8: chosen target ``+alpha (p_hat - 1/2)``, rejected ``-alpha (p_hat - 1/2)``)
    on its own pairs, with reparameterised samples ``r = mu + a sigma``, ``a ~ N(0, 1)`` drawn per
    response per step (the paper's notation reads as one ``a`` per pair; the expected loss is the
    same). Adam, mini-batches of a shuffled order each epoch. Features are standardised internally
    (mean and std over the 2N training responses); every ``mu_i`` starts as the centred stage-1
    head, every ``c_i`` so that softplus is the root mean square of the targets (the noise starts
    the size of the signal), every ``v_i`` small and random (norm ~ ``SIGMA_INIT_WEIGHT_NORM``). The
    generator's draws, in order: the assignment, the ``v_i`` head by head, then per epoch the
    order and per step the noise.

    Note that ``E_a[loss] = (mu_c - t)^2 + sigma_c^2 + (mu_r + t)^2 + sigma_r^2``: in expectation the
    loss only pushes every sigma down towards ``eps``; how far each gets by the end of training is
    what the heads' sigmas (and BRME's nominal head, the smallest sigma) reflect.

    Args:
        chosen: features of the chosen responses, (N, H).
        rejected: features of the rejected responses, (N, H).
        heads: k >= 1; N >= k.
        seed: seeds the assignment, the sigma initialisation, the shuffling and the noise.
        alpha: the target scale (> 0); targets lie in ``[-alpha/2, alpha/2]``.
        eps: the floor of sigma (> 0).
        epochs: passes over the pairs (>= 1).
        lr: Adam's learning rate on standardised features (> 0).
        batch_size: pairs per step (>= 1).
        l2: the stage-1 L2 penalty (> 0).
        stage_one: the stage-1 head's weights on raw features, (H,); None: fit one.
        bsr: BSR's weight on ``mean(mu)^2`` over each step's 2B responses (eq. 25; 0: none).
        progress: show a progress bar over epochs on stderr.

    Returns:
        The heads on raw features, float32.

    Raises:
        ValueError: bad shapes, fewer pairs than heads, non-finite features, or an out-of-range
            hyperparameter.
    """
    _check_pairs(chosen, rejected, heads)
    for name, value in (("alpha", alpha), ("eps", eps), ("lr", lr), ("l2", l2)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}.")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}.")
    n, hidden = chosen.shape
    if bsr < 0 or not math.isfinite(bsr):
        raise ValueError(f"bsr must be a finite number >= 0, got {bsr}.")
    if stage_one is not None and stage_one.shape != (hidden,):
        raise ValueError(
            f"stage_one must be one head on the features, ({hidden},), got {tuple(stage_one.shape)}."
        )
    # stage 1: one Bradley-Terry head on every pair (or the given one)
    w1 = (
        stage_one.double()
        if stage_one is not None
        else fit_head(chosen.double() - rejected.double(), l2, "bt").double()
    )  # (H,)
    p_hat = torch.sigmoid((chosen.double() - rejected.double()) @ w1).float()  # (N,)
    target_rms = (alpha * (p_hat.double() - 0.5)).pow(2).mean().sqrt().item()
    sigma_init = max(target_rms, eps)  # the softplus part of every sigma at the start

    # stage 2, on standardised features z = (h - mean) / scale
    mean, scale = _standardiser(torch.cat([chosen, rejected]).double())  # (H,), (H,)
    z_c = ((chosen.double() - mean) / scale).float()  # (N, H)
    z_r = ((rejected.double() - mean) / scale).float()  # (N, H)
    generator = torch.Generator().manual_seed(seed)
    assignment = partition_pairs(n, heads, generator)  # (N,)
    mean_w = (w1 * scale).float().expand(heads, hidden).clone().requires_grad_()  # (k, H): r1 on z
    mean_b = torch.zeros(heads, requires_grad=True)  # (k,): with centred z, mu_i = r1 - mean r1
    std_w = torch.stack(
        [
            torch.randn(hidden, generator=generator) * (SIGMA_INIT_WEIGHT_NORM / math.sqrt(hidden))
            for _ in range(heads)
        ]
    ).requires_grad_()  # (k, H)
    std_b = torch.full(
        (heads,), math.log(math.expm1(sigma_init)), requires_grad=True
    )  # (k,): softplus = sigma_init
    optimiser = torch.optim.Adam([mean_w, mean_b, std_w, std_b], lr=lr)

    bar = tqdm(range(epochs), desc="brme", unit="epoch", disable=not progress, file=sys.stderr)
    for _ in bar:
        order = torch.randperm(n, generator=generator)  # (N,)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]  # (B,)
            head = assignment[idx]  # (B,)
            zc, zr = z_c[idx], z_r[idx]  # (B, H)
            pick = head[:, None]  # (B, 1): each pair's own head
            mu_c = (zc @ mean_w.T + mean_b).gather(1, pick)[:, 0]  # (B,)
            mu_r = (zr @ mean_w.T + mean_b).gather(1, pick)[:, 0]  # (B,)
            sigma_c = F.softplus((zc @ std_w.T + std_b).gather(1, pick)[:, 0]) + eps  # (B,)
            sigma_r = F.softplus((zr @ std_w.T + std_b).gather(1, pick)[:, 0]) + eps  # (B,)
            noise = torch.randn(2, len(idx), generator=generator)  # (2, B)
            loss = brme_loss(mu_c, sigma_c, mu_r, sigma_r, p_hat[idx], alpha, noise[0], noise[1]).mean()
            if bsr:
                loss = loss + bsr * torch.cat([mu_c, mu_r]).mean() ** 2
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / n:.4f}", refresh=False)

    def fold(w_z: torch.Tensor, b_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w_raw = w_z.detach().double() / scale  # (k, H): w_z . (h - mean) / scale = w_raw . h - w_raw . mean
        return w_raw.float(), (b_z.detach().double() - w_raw @ mean).float()

    mean_weight, mean_bias = fold(mean_w, mean_b)
    std_weight, std_bias = fold(std_w, std_b)
    return BrmeWeights(mean_weight, mean_bias, std_weight, std_bias, eps)


# ----------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class HeadEvaluation:
    """Pairwise accuracy (chosen reward strictly above rejected) of each head and each aggregate.

    Attributes:
        pairs: how many pairs were scored.
        heads: one interval per head, in head order.
        aggregates: one interval per aggregate of ``AGGREGATES`` but ``std``, in that order.
        nominal: what the nominal head was: ``"head j"`` or ``"argmin sigma"``.
    """

    pairs: int
    heads: tuple[Interval, ...]
    aggregates: dict[AggregateName, Interval]
    nominal: str


def evaluate_heads(
    chosen_heads: torch.Tensor,
    rejected_heads: torch.Tensor,
    chosen_std: torch.Tensor | None,
    rejected_std: torch.Tensor | None,
    *,
    nominal_head: int | None,
    params: AggregationParams,
) -> HeadEvaluation:
    """Pairwise accuracy with binomial standard errors, per head and per aggregate.

    ``std`` is not scored: it measures disagreement, not reward.

    Args:
        chosen_heads: head rewards of the chosen responses, (N, k) (BRME: the means ``mu``).
        rejected_heads: head rewards of the rejected responses, (N, k).
        chosen_std: BRME sigmas of the chosen responses, (N, k), or None.
        rejected_std: BRME sigmas of the rejected responses, (N, k), or None.
        nominal_head: the nominal head of every input, or None for BRME's per-input smallest sigma
            (each response's own).
        params: the lambdas of ``uwo`` and ``tradeoff``.

    Returns:
        The accuracies.

    Raises:
        ValueError: shapes that do not match, no pairs, ``nominal_head`` out of range, or
            ``nominal_head=None`` without both sigmas.
    """
    if chosen_heads.ndim != 2 or chosen_heads.shape != rejected_heads.shape or chosen_heads.shape[0] < 1:
        raise ValueError(
            f"chosen_heads and rejected_heads must both be (N, k) with N >= 1, got "
            f"{tuple(chosen_heads.shape)} and {tuple(rejected_heads.shape)}."
        )
    n, k = chosen_heads.shape
    for name, std in (("chosen_std", chosen_std), ("rejected_std", rejected_std)):
        if std is not None and std.shape != chosen_heads.shape:
            raise ValueError(f"{name} must be (N, k) = {(n, k)} like the rewards, got {tuple(std.shape)}.")
    if nominal_head is None:
        if chosen_std is None or rejected_std is None:
            raise ValueError(
                "nominal_head=None picks each input's smallest-sigma head; pass chosen_std and "
                "rejected_std, or a fixed nominal_head."
            )
        nominal_c, nominal_r = brme_nominal_index(chosen_std), brme_nominal_index(rejected_std)  # (N,)
        nominal = "argmin sigma"
    else:
        if not 0 <= nominal_head < k:
            raise ValueError(f"nominal_head must be in [0, {k}) or None, got {nominal_head}.")
        nominal_c = nominal_r = torch.full((n,), nominal_head, dtype=torch.long)  # (N,)
        nominal = f"head {nominal_head}"

    def interval(won: torch.Tensor) -> Interval:
        return binomial_interval(int(won.sum()), n)

    per_head = tuple(interval(chosen_heads[:, j] > rejected_heads[:, j]) for j in range(k))
    names: tuple[AggregateName, ...] = tuple(name for name in AGGREGATES if name != "std")
    agg_c = aggregate(chosen_heads, nominal_c, params, names)  # name -> (N,)
    agg_r = aggregate(rejected_heads, nominal_r, params, names)  # name -> (N,)
    per_aggregate = {name: interval(agg_c[name] > agg_r[name]) for name in names}
    return HeadEvaluation(n, per_head, per_aggregate, nominal)


def format_report(evaluation: HeadEvaluation) -> str:
    """A table: one line per head, then one per aggregate, with accuracy, standard error and 95% interval."""
    lines = [
        f"pairwise accuracy on {evaluation.pairs} pairs (nominal = {evaluation.nominal})",
        f"{'':<10} {'accuracy':>8} {'s.e.':>7}  95% interval",
    ]
    rows = [(f"head {j}", acc) for j, acc in enumerate(evaluation.heads)]
    rows += list(evaluation.aggregates.items())
    for name, acc in rows:
        lines.append(
            f"{name:<10} {acc.value:>8.4f} {acc.standard_error:>7.4f}  [{acc.low:.4f}, {acc.high:.4f}]"
        )
    return "\n".join(lines)
