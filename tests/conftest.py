"""Shared fixtures; tests are marked unit / kernels / models / commands / api / e2e by their folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import BUILDERS, HEAD_MODELS, build_head_model

TIERS = {"unit", "kernels", "models", "commands", "api", "e2e"}
# The kernel_device fixture of the Triton kernel tests.
pytest_plugins = ["tests.interpreter"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of tiny random reward models: llama, qwen2, gpt_neox, bert."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def tiny_head_model_dirs(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Folders of tiny multihead and brme models on the tiny llama backbone (see ``HEAD_MODELS``)."""
    root = tmp_path_factory.mktemp("tiny-head-models")
    return {kind: build_head_model(root / kind, tiny_model_dirs["llama"], kind) for kind in HEAD_MODELS}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
