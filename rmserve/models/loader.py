"""Loads a model folder as the backend of its kind.

A folder with an ``rmserve.json`` names its kind there (``multihead``, ``brme``, ``ensemble``, ``moe``,
``lora``, ``branched``, ``dmoerm``, or
``dense`` for a plain checkpoint that declares its pooling rule); any other Hugging Face folder is
``dense``. ``kind="auto"`` follows the folder; an explicit kind must match it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

from rmserve.config import LoadOptions
from rmserve.models.base import Backend, RewardModel
from rmserve.models.branched import BranchedRewardModel
from rmserve.models.dense import DenseRewardModel
from rmserve.models.descriptor import DESCRIPTOR
from rmserve.models.dmoerm import DmoermRewardModel
from rmserve.models.ensemble import EnsembleRewardModel
from rmserve.models.heads import MultiHeadRewardModel
from rmserve.models.lora import LoraRewardModel
from rmserve.models.moe import MoERewardModel
from rmserve.names import KINDS, ModelKind


def folder_kind(path: Path) -> ModelKind:
    """The kind a model folder holds.

    Raises:
        ValueError: the folder does not exist, or its ``rmserve.json`` names no known kind.
    """
    if not path.is_dir():
        raise ValueError(f"model folder {path} does not exist; check the model path.")
    descriptor = path / DESCRIPTOR
    if not descriptor.is_file():
        return "dense"
    try:
        kind = json.loads(descriptor.read_text()).get("kind")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{descriptor} is not a JSON object; it must say its 'kind'.") from None
    if kind not in KINDS:
        raise ValueError(f"{descriptor} has kind {kind!r}; expected one of {', '.join(KINDS)}.")
    return cast(ModelKind, kind)


# Each backend's score takes the encodings of its own new_encoder, a narrower type than the contract's
# Encoded; the registry only ever pairs a model with its own encoder, which the cast records.
BACKENDS = cast(
    dict[ModelKind, Backend],
    {
        "dense": DenseRewardModel,
        "multihead": MultiHeadRewardModel,
        "brme": MultiHeadRewardModel,
        "ensemble": EnsembleRewardModel,
        "moe": MoERewardModel,
        "lora": LoraRewardModel,
        "branched": BranchedRewardModel,
        "dmoerm": DmoermRewardModel,
    },
)


def backend_for(name: str, path: Path, kind: str = "auto") -> tuple[ModelKind, Backend]:
    """The kind ``path`` holds and its backend, checked against a configured ``kind``.

    Raises:
        ValueError: the kind is unknown, or does not match the folder.
    """
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: auto, {', '.join(KINDS)}.")
    found = folder_kind(path)
    if kind not in ("auto", found):
        raise ValueError(f"model {name!r} is configured as kind {kind!r}, but {path} holds a {found} model.")
    return found, BACKENDS[found]


def load_model(name: str, path: Path, options: LoadOptions = LoadOptions()) -> RewardModel:
    """Load ``path`` as a model of ``options.kind`` (``auto``: the folder's own kind).

    ``quantize`` (``none``, ``int8``, ``nf4``) applies to every backend's transformer weights, through
    bitsandbytes (``rmserve.models.quantize``). ``pooling`` (``hf``, ``last``; None: what the folder
    declares, else ``hf``) applies to every decoder, each ensemble member included.

    Raises:
        ValueError: the kind is unknown, does not match the folder, or the folder is not such a model.
    """
    _, backend = backend_for(name, path, options.kind)
    return backend(name, path, options)
