"""Shared fixtures; tests are marked unit / kernels / models / commands / api / e2e by their folder."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rmserve.training.hh import dialogue_to_messages
from tests.tiny_models import BUILDERS, DATA, HEAD_MODELS, build_head_model

PAIRS = 40

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


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 40 HH pairs as TRL conversational pairs (implicit prompt)."""
    if not DATA.is_file():
        pytest.skip(f"{DATA} is missing")
    out = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with gzip.open(DATA, "rt") as f, out.open("w") as w:
        for _, line in zip(range(PAIRS), f, strict=False):
            row = json.loads(line)
            chosen, rejected = (dialogue_to_messages(row[k]) for k in ("chosen", "rejected"))
            w.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    return out
