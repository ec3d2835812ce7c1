"""Compiled decoder forwards (``--compile``): rewards equal transformers', and no request compiles.

A compiled model compiles its two graphs in the load warm-up (tens of seconds each model here); afterwards
every batch shape the server forms (one input, a padded batch, packed rows, a one-token input, a prefix
plan) scores within float32 rounding of plain transformers and compiles nothing new.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch._dynamo.utils import counters

from rmserve.batching.planning import BatchLimits
from rmserve.batching.prefix import plan_prefixes
from rmserve.config import LoadOptions, ModelSpec, Settings
from rmserve.memory.estimate import estimate_model
from rmserve.models.compile import check_compilable
from rmserve.models.dense import DenseRewardModel
from rmserve.models.heads import MultiHeadRewardModel
from rmserve.models.inputs import PromptResponse, TokenIds
from rmserve.models.loader import load_model
from rmserve.scoring.loading import warm_up
from tests.models.test_dense_parity import oracle
from tests.prefix_batches import shared_prompt_inputs

pytestmark = pytest.mark.models

FP32 = {"dtype": "float32", "device": "cpu"}
LIMITS = BatchLimits(max_batch_tokens=1 << 16, max_batch_size=64, max_join_padding=1 << 16)


def lambdas(n: int) -> dict[str, torch.Tensor]:
    return {"uwo_lambda": torch.linspace(0, 2, n), "tradeoff_lambda": torch.linspace(0, 1, n)}


def graphs() -> int:
    """Graphs torch.compile has captured in this process so far."""
    return counters["stats"]["unique_graphs"]


def batches_of_every_shape(model: DenseRewardModel | MultiHeadRewardModel, packing) -> list[list]:
    """One input; ragged rows that pack; equal rows that pad; one token alone and among others."""
    encoder = model.new_encoder()
    ragged = list(encoder.encode_many(shared_prompt_inputs()))
    equal = list(encoder.encode_many([PromptResponse(prompt="Hi.", response="Hello there.")] * 3))
    one_token = list(encoder.encode_many([TokenIds(input_ids=[5])]))
    assert packing.rows([len(e) for e in ragged]) is not None, "the ragged batch must run packed"
    assert packing.rows([len(e) for e in equal]) is None, "the equal batch must run padded"
    return [ragged[:1], ragged[2:3], ragged, equal, one_token, one_token + ragged[:2]]


def test_compiled_dense_rewards_equal_transformers_and_requests_compile_nothing(tiny_model_dirs):
    folder = tiny_model_dirs["llama"]
    model = DenseRewardModel("m", folder, LoadOptions(**FP32, compile=True))
    assert model.info.compiled and model.compiled is not None
    before = graphs()
    warm_up(model)
    assert graphs() > before, "the warm-up compiles the model's graphs"
    after_warm_up = graphs()
    assert model.packing is not None
    with ThreadPoolExecutor(1) as forward_thread:  # as the server runs forwards: off the loading thread
        for batch in batches_of_every_shape(model, model.packing):
            got = (
                forward_thread.submit(model.score, batch, **lambdas(len(batch))).result().heads[:, 0].tolist()
            )
            assert got == pytest.approx([oracle(folder, e, "hf") for e in batch], abs=1e-4)
    ragged = list(model.new_encoder().encode_many(shared_prompt_inputs()))
    plan = plan_prefixes([e.token_ids for e in ragged], 4, LIMITS)
    assert plan.groups, "the batch must share prefixes"
    got = model.score(ragged, plan=plan, **lambdas(len(ragged))).heads[:, 0].tolist()
    assert got == pytest.approx([oracle(folder, e, "hf") for e in ragged], abs=1e-4)
    assert graphs() == after_warm_up, "a request compiled a new graph"


def test_compiled_head_model_equals_its_eager_forward(tiny_head_model_dirs):
    eager = load_model("e", tiny_head_model_dirs["brme"], LoadOptions(**FP32))
    compiled = load_model("c", tiny_head_model_dirs["brme"], LoadOptions(**FP32, compile=True))
    assert isinstance(compiled, MultiHeadRewardModel) and isinstance(eager, MultiHeadRewardModel)
    assert compiled.info.compiled and not eager.info.compiled
    warm_up(compiled)
    after_warm_up = graphs()
    assert compiled.backbone.packing is not None
    for batch in batches_of_every_shape(compiled, compiled.backbone.packing):
        want, got = eager.score(batch, **lambdas(len(batch))), compiled.score(batch, **lambdas(len(batch)))
        assert got.head_std is not None and want.head_std is not None
        torch.testing.assert_close(got.heads, want.heads, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.head_std, want.head_std, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.aggregates, want.aggregates, atol=1e-4, rtol=0)
    assert graphs() == after_warm_up


@pytest.mark.parametrize(
    ("kind", "quantize", "message"),
    [
        ("moe", "none", "applies to dense, lora, multihead, brme, ensemble models, not moe"),
        ("branched", "none", "not branched"),
        ("dmoerm", "none", "not dmoerm"),
        ("dense", "int8", "not supported with --quantize int8"),
    ],
)
def test_compile_is_refused_where_it_does_not_apply(kind, quantize, message):
    with pytest.raises(ValueError, match=message):
        check_compilable("m", kind, quantize)


def test_compile_is_refused_for_an_encoder_before_anything_compiles(tiny_model_dirs):
    with pytest.raises(ValueError, match="BertForSequenceClassification is not a decoder"):
        DenseRewardModel("bert", tiny_model_dirs["bert"], LoadOptions(**FP32, compile=True))


def test_a_failing_compilation_stops_the_load_with_what_to_do(tiny_model_dirs, monkeypatch):
    model = DenseRewardModel("m", tiny_model_dirs["llama"], LoadOptions(**FP32))
    model.info = dataclasses.replace(model.info, compiled=True)

    def fail(batch, **lambdas):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(model, "score", fail)
    with pytest.raises(
        RuntimeError, match=r"torch.compile failed at load \(OSError: no C\+\+ compiler"
    ) as info:
        warm_up(model)
    assert "serve it without --compile" in str(info.value)


def test_the_memory_plan_counts_a_compiled_models_frozen_weights(tiny_model_dirs):
    eager = estimate_model(
        "m", tiny_model_dirs["llama"], LoadOptions(**FP32), max_batch_tokens=512, max_batch_size=8
    )
    compiled = estimate_model(
        "m",
        tiny_model_dirs["llama"],
        LoadOptions(**FP32, compile=True),
        max_batch_tokens=512,
        max_batch_size=8,
    )
    assert compiled.activation_bytes == eager.activation_bytes
    assert compiled.weights_bytes == 2 * eager.weights_bytes  # the eager module, and the graph's frozen copy


def test_compile_comes_from_the_model_spec_else_the_server():
    on = Settings(compile=True)
    assert on.load_options(ModelSpec(name="a", path="a")).compile is True
    assert on.load_options(ModelSpec(name="a", path="a", compile=False)).compile is False
    assert Settings().load_options(ModelSpec(name="a", path="a", compile=True)).compile is True
    assert Settings().load_options(ModelSpec(name="a", path="a")).compile is False
