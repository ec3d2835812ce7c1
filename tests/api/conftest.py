"""Models the API tests share: the tiny llama (dense) and the tiny BRME model, float32 on CPU."""

from __future__ import annotations

import pytest

from rmserve.config import LoadOptions
from rmserve.models.dense import DenseRewardModel
from rmserve.models.heads import MultiHeadRewardModel


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return DenseRewardModel(
        "tiny-llama", tiny_model_dirs["llama"], LoadOptions(dtype="float32", device="cpu")
    )


@pytest.fixture(scope="module")
def brme(tiny_head_model_dirs):
    return MultiHeadRewardModel(
        "tiny-brme", tiny_head_model_dirs["brme"], LoadOptions(dtype="float32", device="cpu")
    )
