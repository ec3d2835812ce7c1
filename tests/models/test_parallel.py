"""Split forwards on the CPU (``--cpu-row-threads``): a batch's parts side by side score exactly as one forward.

Dense decoders are compared with plain transformers on each sequence alone, head models with their own
unsplit forward; the threads' modes and torch thread counts are checked on their own.
"""

from __future__ import annotations

import pytest
import torch

from rmserve.config import LoadOptions, ModelSpec, Settings
from rmserve.models.dense import DenseRewardModel
from rmserve.models.heads import MultiHeadRewardModel
from rmserve.models.inputs import PromptResponse
from rmserve.models.loader import load_model
from rmserve.models.parallel import RowThreads, row_threads, split_evenly
from tests.models.test_dense_parity import oracle
from tests.prefix_batches import shared_prompt_inputs

pytestmark = pytest.mark.models

FP32 = {"dtype": "float32", "device": "cpu"}


def lambdas(n: int) -> dict[str, torch.Tensor]:
    return {"uwo_lambda": torch.linspace(0, 2, n), "tradeoff_lambda": torch.linspace(0, 1, n)}


def batches(model: DenseRewardModel | MultiHeadRewardModel) -> list[list]:
    """Ragged inputs (packed rows), equal ones (a padded batch, in slices), one input (unsplit)."""
    encoder = model.new_encoder()
    ragged = list(encoder.encode_many(shared_prompt_inputs()))
    equal = list(encoder.encode_many([PromptResponse(prompt="Hi.", response="Hello there.")] * 5))
    return [ragged, ragged[:2], equal, ragged[:1]]


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
@pytest.mark.parametrize("threads", [2, 3])
def test_split_dense_rewards_equal_transformers(arch, threads, tiny_model_dirs):
    model = DenseRewardModel("m", tiny_model_dirs[arch], LoadOptions(**FP32, cpu_row_threads=threads))
    assert model.threads is row_threads(threads) and model.threads is not None
    assert model.packing is not None and model.packing.rows([3, 3, 3, 3, 3]) is None  # equal rows: padded
    for batch in batches(model):
        got = model.score(batch, **lambdas(len(batch))).heads[:, 0].tolist()
        assert got == pytest.approx([oracle(tiny_model_dirs[arch], e) for e in batch], abs=1e-4)
    model.packing = None  # a model that never packs splits its padded batches
    batch = batches(model)[0]
    got = model.score(batch, **lambdas(len(batch))).heads[:, 0].tolist()
    assert got == pytest.approx([oracle(tiny_model_dirs[arch], e) for e in batch], abs=1e-4)


def test_split_head_model_equals_its_unsplit_forward(tiny_head_model_dirs):
    whole = load_model("w", tiny_head_model_dirs["brme"], LoadOptions(**FP32))
    split = load_model("s", tiny_head_model_dirs["brme"], LoadOptions(**FP32, cpu_row_threads=2))
    assert isinstance(whole, MultiHeadRewardModel) and isinstance(split, MultiHeadRewardModel)
    assert whole.backbone.threads is None and split.backbone.threads is not None
    for batch in batches(split):
        want, got = whole.score(batch, **lambdas(len(batch))), split.score(batch, **lambdas(len(batch)))
        assert got.head_std is not None and want.head_std is not None
        torch.testing.assert_close(got.heads, want.heads, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.head_std, want.head_std, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.aggregates, want.aggregates, atol=1e-4, rtol=0)


def test_every_part_runs_in_the_callers_modes_on_its_share_of_the_cores():
    threads = RowThreads(2, cores=2)  # the cores are torch's threads after every part: keep them true
    assert threads.torch_threads == 1
    before = torch.get_num_threads()

    def modes(part: int) -> tuple[int, bool, bool, bool, torch.dtype, int]:
        return (
            part,
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cpu"),
            torch.get_num_threads(),
        )

    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = threads.map(modes, [0, 1, 2])
    assert got == [(p, False, True, True, torch.bfloat16, 1) for p in (0, 1, 2)]
    assert torch.get_num_threads() == before  # the caller's own count is back
    assert threads.map(modes, [7])[0][1:4] == (True, False, False)  # one part: the caller's modes, unsplit
    with pytest.raises(ValueError, match="at least 2 threads"):
        RowThreads(1)
    assert row_threads(1) is None


def test_a_failing_part_fails_the_whole_forward():
    threads = RowThreads(2, cores=2)

    def part(k: int) -> int:
        if k == 1:
            raise RuntimeError("part 1 broke")
        return k

    with pytest.raises(RuntimeError, match="part 1 broke"):
        threads.map(part, [0, 1])


def test_split_evenly_cuts_in_order_into_nearly_equal_slices():
    assert split_evenly(5, 2) == [range(0, 3), range(3, 5)]
    assert split_evenly(2, 3) == [range(0, 1), range(1, 2)]
    assert split_evenly(6, 3) == [range(0, 2), range(2, 4), range(4, 6)]


def test_row_threads_come_from_the_server_settings():
    assert Settings(cpu_row_threads=2).load_options(ModelSpec(name="a", path="a")).cpu_row_threads == 2
    assert Settings().load_options(ModelSpec(name="a", path="a")).cpu_row_threads == 1
