"""The demo head's Bradley-Terry fit, on synthetic features with a known answer."""

from __future__ import annotations

import torch

from rmserve.training.demo_head import fit_bt_head, pairwise_accuracy


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(16)
    direction[3] = 1.0
    chosen = torch.randn(n, 16, generator=g) * torch.linspace(0.1, 10, 16)
    rejected = torch.randn(n, 16, generator=g) * torch.linspace(0.1, 10, 16)
    margin = (chosen - rejected) @ direction
    swap = margin < 0
    chosen[swap], rejected[swap] = rejected[swap].clone(), chosen[swap].clone()
    chosen[:, 3] += 2.0  # a margin along the known direction
    return chosen, rejected, direction


def test_separable_preferences_are_learned_exactly():
    chosen, rejected, _ = synthetic(400, 0)
    w = fit_bt_head(chosen - rejected, l2=1e-4)
    test_c, test_r, _ = synthetic(400, 1)
    assert pairwise_accuracy(w, chosen, rejected) == 1.0
    assert pairwise_accuracy(w, test_c, test_r) == 1.0
    assert w.abs().argmax().item() == 3


def test_the_folded_head_acts_on_raw_features():
    chosen, rejected, _ = synthetic(200, 2)
    diffs = chosen - rejected
    w = fit_bt_head(diffs, l2=1e-2)
    scale = diffs.pow(2).mean(0).sqrt()
    w_scaled = w * scale  # the weights the optimiser saw
    assert torch.allclose((diffs / scale) @ w_scaled, diffs @ w, atol=1e-4)


def test_strong_l2_shrinks_the_head():
    chosen, rejected, _ = synthetic(200, 3)
    weak, strong = fit_bt_head(chosen - rejected, 1e-4), fit_bt_head(chosen - rejected, 1.0)
    assert strong.norm() < weak.norm()
