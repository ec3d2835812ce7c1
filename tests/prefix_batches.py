"""Batches whose inputs share prefixes, and the check that a prefix plan scores them as the full forward does."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rmserve.batching.planning import BatchLimits
from rmserve.batching.prefix import PrefixPlan, plan_prefixes
from rmserve.models.base import RewardModel
from rmserve.models.inputs import EncodedInput, Message, Messages, PromptResponse, RewardInput, TokenIds

PROMPT = "Tell me a long story about a cat who liked boxes and lived by the sea. " * 3
TURNS = [
    Message(role="user", content="How do I bake bread at home?"),
    Message(role="assistant", content="Mix flour, water, yeast and salt."),
    Message(role="user", content="And then?"),
]


def shared_prompt_inputs() -> list[RewardInput]:
    """Responses to one prompt (GRPO's shape), a multi-turn group, and inputs that share nothing."""
    responses = ["Once upon a time.", "No.", "The cat " * 9, "It slept in a box all day, dreaming of fish."]
    items: list[RewardInput] = [PromptResponse(prompt=PROMPT, response=r) for r in responses]
    items += [
        Messages(messages=[*TURNS, Message(role="assistant", content=r)])
        for r in ("Knead it.", "Bake it at 230 C for half an hour.")
    ]
    items += [
        PromptResponse(prompt="hi", response="hello"),
        PromptResponse(prompt="What is 2+2?", response="4"),
    ]
    return items


def with_trailing_pads(encoded: Sequence[EncodedInput], pad_id: int) -> list[TokenIds]:
    """Inputs whose scored token (``hf``: the last non-pad) lies inside their shared prefix."""
    ids = list(encoded[0].token_ids[:24])
    return [TokenIds(input_ids=ids + [pad_id] * n) for n in (3, 6)]


def check_prefix_parity(
    model: RewardModel, encoded: Sequence[EncodedInput], min_tokens: int = 4
) -> PrefixPlan:
    """The model's outputs with a prefix plan equal its one-forward outputs (fp32, 1e-4); returns the plan."""
    plan = plan_prefixes([e.token_ids for e in encoded], min_tokens, BatchLimits(8192, 64, 8))
    assert plan.groups and plan.reused_tokens > 0, "the batch must share prefixes for the test to bite"
    n = len(encoded)
    lambdas = {"uwo_lambda": torch.linspace(0, 2, n), "tradeoff_lambda": torch.linspace(0, 1, n)}
    full = model.score(encoded, **lambdas)
    shared = model.score(encoded, **lambdas, plan=plan)
    torch.testing.assert_close(shared.heads, full.heads, atol=1e-4, rtol=0)
    torch.testing.assert_close(shared.aggregates, full.aggregates, atol=1e-4, rtol=0)
    if full.head_std is not None:
        assert shared.head_std is not None
        torch.testing.assert_close(shared.head_std, full.head_std, atol=1e-4, rtol=0)
    assert float(full.heads.abs().max()) > 0.1, "rewards must be large enough for the tolerance to bite"
    return plan
