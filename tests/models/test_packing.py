"""Packed forwards: a batch run as one sequence without padding scores exactly as each input alone.

Dense decoders are compared with plain transformers on each sequence alone, head models with their own
padded forward; the rule that decides when to pack is checked on its own.
"""

from __future__ import annotations

import pytest
import torch

from rmserve.config import LoadOptions
from rmserve.models.dense import DenseRewardModel
from rmserve.models.heads import MultiHeadRewardModel
from rmserve.models.loader import load_model
from rmserve.models.packing import Packing, packing_for
from rmserve.names import CPU_PACKED_TOKENS
from tests.models.test_dense_parity import oracle
from tests.prefix_batches import shared_prompt_inputs, with_trailing_pads

pytestmark = pytest.mark.models

FP32 = {"dtype": "float32", "device": "cpu"}
ALWAYS = Packing(max_tokens=1 << 20, pair_cost=0.0)  # packs every batch with any padding into one row
SHORT_ROWS = Packing(max_tokens=40, pair_cost=0.0, fixed_tokens=0)  # rows of at most 40 tokens


def lambdas(n: int) -> dict[str, torch.Tensor]:
    return {"uwo_lambda": torch.linspace(0, 2, n), "tradeoff_lambda": torch.linspace(0, 1, n)}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("pooling", ["hf", "last"])
@pytest.mark.parametrize("rule", [ALWAYS, SHORT_ROWS], ids=["one-row", "short-rows"])
def test_packed_dense_rewards_equal_transformers(arch, pooling, rule, tiny_model_dirs):
    model = DenseRewardModel("m", tiny_model_dirs[arch], LoadOptions(**FP32, pooling=pooling))
    assert model.packing is not None and model.packing.max_tokens == CPU_PACKED_TOKENS
    model.packing = rule
    encoder = model.new_encoder()
    encoded = list(encoder.encode_many(shared_prompt_inputs()))
    if model.pooling.pad_token_id is not None:  # hf: the scored token is not the last one
        encoded += encoder.encode_many(with_trailing_pads(encoded, model.pooling.pad_token_id))
    assert len({len(e) for e in encoded}) > 3, "the batch must be ragged for packing to bite"
    rows = rule.rows([len(e) for e in encoded])
    assert rows is not None and (len(rows) == 1 if rule is ALWAYS else len(rows) > 2)
    got = model.score(encoded, **lambdas(len(encoded))).heads[:, 0].tolist()
    want = [oracle(tiny_model_dirs[arch], e, pooling) for e in encoded]
    assert got == pytest.approx(want, abs=1e-4)
    assert max(abs(w) for w in want) > 0.1, "rewards must be large enough for the tolerance to bite"


@pytest.mark.parametrize("kind", ["multihead", "brme"])
def test_packed_head_models_equal_their_padded_forward(kind, tiny_head_model_dirs):
    packed = load_model(kind, tiny_head_model_dirs[kind], LoadOptions(**FP32))
    padded = load_model(kind, tiny_head_model_dirs[kind], LoadOptions(**FP32, max_packed_tokens=0))
    assert isinstance(packed, MultiHeadRewardModel) and isinstance(padded, MultiHeadRewardModel)
    assert packed.backbone.packing is not None and padded.backbone.packing is None
    packed.backbone.packing = ALWAYS
    encoded = packed.new_encoder().encode_many(shared_prompt_inputs())
    got = packed.score(encoded, **lambdas(len(encoded)))
    want = padded.score(encoded, **lambdas(len(encoded)))
    torch.testing.assert_close(got.heads, want.heads, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.aggregates, want.aggregates, atol=1e-4, rtol=0)
    if want.head_std is not None:
        assert got.head_std is not None
        torch.testing.assert_close(got.head_std, want.head_std, atol=1e-4, rtol=0)


def test_packing_is_off_for_encoders_other_architectures_and_gpus(tiny_model_dirs):
    assert DenseRewardModel("b", tiny_model_dirs["bert"], LoadOptions(**FP32)).packing is None
    config = DenseRewardModel("m", tiny_model_dirs["llama"], LoadOptions(**FP32)).model.config
    assert packing_for(config, None, torch.device("cuda")) is None  # padding is nearly free on a GPU
    assert packing_for(config, 0, torch.device("cpu")) is None
    on_gpu = packing_for(config, 512, torch.device("cuda"))  # asked for: packs there too
    assert on_gpu is not None and on_gpu.max_tokens == 512
    config.model_type = "phi3"  # not covered by the parity tests: never packed
    assert packing_for(config, None, torch.device("cpu")) is None


def test_packing_pays_only_for_ragged_batches():
    rule = Packing(max_tokens=1000, pair_cost=1e-3, fixed_tokens=32)
    assert rule.row_tokens == 179  # sqrt(32 / 1e-3): one more forward costs what a longer row would
    assert rule.rows([8, 32, 16, 24]) == [[0, 1, 2, 3]]  # 80 tokens packed against 128 padded
    assert rule.rows([20, 20, 20]) is None  # no padding to save
    assert rule.rows([30]) is None  # one input: nothing to pack
    dear = Packing(max_tokens=1000, pair_cost=0.05)  # attention so dear that rows hold 25 tokens
    assert dear.rows([8, 32, 16, 24]) == [[0], [1], [2], [3]]  # one forward each beats the padded 32 x 4
    assert dear.rows([30, 32, 31, 32]) is None  # little padding: one padded forward wins


def test_a_batch_packs_in_order_into_the_cheapest_rows():
    rule = Packing(max_tokens=64, pair_cost=1e-3, fixed_tokens=32)
    assert rule.row_tokens == 64  # capped by max_tokens
    # rows filled in order to 64 ([[0, 1], [2], [3], [4, 5], [6]]) cost 346; five even rows cost 344.4,
    # and the even cuts into four rows would put 80 tokens in one row of two inputs, over max_tokens
    assert rule.rows([30, 30, 10, 70, 5, 5, 60]) == [[0], [1, 2], [3], [4, 5], [6]]
    assert rule.rows([100, 100, 100, 90]) is None  # rows of one each: more forwards, little padding saved
    wide = Packing(max_tokens=2048, pair_cost=3.6e-4, fixed_tokens=32)  # the 4 x 512 model of bench/peers.py
    assert wide.row_tokens == 298
    sixteen = [8 + i * 3 % 25 for i in range(16)]  # 313 tokens
    assert wide.rows(sixteen) == [list(range(16))]  # one row beats 298 tokens plus a forward for 15
    thirty_two = sixteen * 2  # 626 tokens: two even rows
    assert wide.rows(thirty_two) == [list(range(16)), list(range(16, 32))]


def test_the_rule_weighs_attention_by_the_architecture(tiny_model_dirs):
    config = DenseRewardModel("m", tiny_model_dirs["llama"], LoadOptions(**FP32)).model.config
    rule = packing_for(config, None, torch.device("cpu"))
    assert rule is not None
    h, i = config.hidden_size, config.intermediate_size
    a = config.num_attention_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    k = config.num_key_value_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    per_token = 2 * (h * (a + 2 * k) + a * h + 3 * h * i)
    assert rule.pair_cost == pytest.approx(4 * a / per_token)
