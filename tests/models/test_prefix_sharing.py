"""Prefix sharing: inputs that begin alike compute their prefix once and score exactly as the full forward.

Dense models are compared with plain transformers on each sequence alone; every kind with a decoder
backbone is compared with its own one-forward path (itself held to transformers by the kind's parity
tests). Other kinds refuse a plan instead of ignoring it.
"""

from __future__ import annotations

import pytest
import torch

from rmserve.batching.planning import BatchLimits
from rmserve.batching.prefix import plan_prefixes
from rmserve.config import LoadOptions
from rmserve.models.dense import DenseRewardModel
from rmserve.models.heads import MultiHeadRewardModel
from rmserve.models.inputs import PromptResponse
from rmserve.models.loader import load_model
from tests.models.test_dense_parity import oracle
from tests.prefix_batches import check_prefix_parity, shared_prompt_inputs, with_trailing_pads

pytestmark = pytest.mark.models

FP32 = {"dtype": "float32", "device": "cpu"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("pooling", ["hf", "last"])
def test_dense_rewards_with_shared_prefixes_equal_transformers(arch, pooling, tiny_model_dirs):
    model = DenseRewardModel("m", tiny_model_dirs[arch], LoadOptions(**FP32, pooling=pooling))
    assert model.info.shares_prefixes
    encoder = model.new_encoder()
    encoded = list(encoder.encode_many(shared_prompt_inputs()))
    if model.pooling.pad_token_id is not None:
        encoded += encoder.encode_many(with_trailing_pads(encoded, model.pooling.pad_token_id))
    plan = check_prefix_parity(model, encoded)
    assert len(plan.groups) >= 2
    n = len(encoded)
    lambdas = {"uwo_lambda": torch.zeros(n), "tradeoff_lambda": torch.zeros(n)}
    got = model.score(encoded, **lambdas, plan=plan).heads[:, 0].tolist()
    want = [oracle(tiny_model_dirs[arch], e, pooling) for e in encoded]
    assert got == pytest.approx(want, abs=1e-4)


def test_a_scored_token_inside_the_prefix_is_read_from_the_prefix(tiny_model_dirs):
    model = DenseRewardModel("m", tiny_model_dirs["llama"], LoadOptions(**FP32, pooling="hf"))
    pad = model.pooling.pad_token_id
    assert pad is not None
    encoder = model.new_encoder()
    encoded = encoder.encode_many(with_trailing_pads(encoder.encode_many(shared_prompt_inputs()), pad))
    plan = plan_prefixes([e.token_ids for e in encoded], 4, BatchLimits(8192, 64, 8))
    (group,) = plan.groups
    ids = torch.tensor([encoded[0].token_ids])
    assert int(model.pooling.positions(ids, torch.tensor([ids.shape[1]]))[0]) < group.prefix
    check_prefix_parity(model, encoded)


def test_left_truncated_inputs_share_what_they_still_share(tiny_model_dirs):
    model = DenseRewardModel("m", tiny_model_dirs["qwen2"], LoadOptions(**FP32))
    encoder = model.new_encoder(48)
    items = [
        PromptResponse(prompt="Tell me a story. " * 20, response=r) for r in ("Yes.", "No.", "Maybe so.")
    ]
    items += [PromptResponse(prompt="short", response="A reply that is long enough. " * 2)] * 2
    encoded = encoder.encode_many(items, truncation="left")
    assert all(e.truncated for e in encoded[:3])
    plan = check_prefix_parity(model, encoded)
    assert [e.token_ids for e in encoded[3:]] == [
        encoded[3].token_ids
    ] * 2  # identical inputs share all but one token
    assert any(g.rows == (3, 4) and g.prefix == len(encoded[3]) - 1 for g in plan.groups)


@pytest.mark.parametrize("kind", ["multihead", "brme"])
def test_head_models_with_shared_prefixes_equal_their_one_forward(kind, tiny_head_model_dirs):
    model = load_model(kind, tiny_head_model_dirs[kind], LoadOptions(**FP32))
    assert isinstance(model, MultiHeadRewardModel) and model.info.shares_prefixes
    check_prefix_parity(model, model.new_encoder().encode_many(shared_prompt_inputs()))


def test_encoders_and_ensembles_refuse_a_plan(tiny_model_dirs):
    model = DenseRewardModel("bert", tiny_model_dirs["bert"], LoadOptions(**FP32))
    assert not model.info.shares_prefixes
    encoded = model.new_encoder().encode_many(shared_prompt_inputs())
    plan = plan_prefixes([e.token_ids for e in encoded], 4, BatchLimits(8192, 64, 8))
    with pytest.raises(ValueError, match="does not share prefixes"):
        model.score(
            encoded,
            uwo_lambda=torch.zeros(len(encoded)),
            tradeoff_lambda=torch.zeros(len(encoded)),
            plan=plan,
        )


def test_offline_scoring_shares_prefixes_and_scores_as_without(tiny_model_dirs):
    from rmserve.config import Settings
    from rmserve.scoring.offline import prefix_work, score_model

    model = DenseRewardModel("m", tiny_model_dirs["llama"], LoadOptions(**FP32))
    inputs = shared_prompt_inputs() * 2  # every input twice: repeats share all but their last token
    shared = score_model(model, inputs, Settings(prefix_min_tokens=4))
    plain = score_model(model, inputs, Settings(prefix_min_tokens=0))
    assert [r.reward for r in shared] == pytest.approx([r.reward for r in plain], abs=1e-4)
    assert [r.input_tokens for r in shared] == [r.input_tokens for r in plain]
    encoded = model.new_encoder().encode_many(inputs)
    work, rest = prefix_work(encoded, 4, BatchLimits(8192, 64, 8))
    assert sorted([i for batch, _ in work for i in batch] + rest) == list(range(len(inputs)))
    assert len(work) >= 2 and all(plan is not None and len(plan.groups) == 1 for _, plan in work)
