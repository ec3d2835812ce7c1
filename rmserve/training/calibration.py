"""Ensemble creation and calibration: each member's reward mean and std over a reference set.

``rmserve ensemble`` writes an ensemble folder from member folders; ``rmserve calibrate`` scores a
reference set with every member (the server's own encoders and forward, length-sorted batches) and
stores each member's mean and population standard deviation in the folder's ``rmserve.json``, so the
served member rewards are ``(r - mean) / std``.

The reference set is a JSONL file of inputs (the API's input forms, as ``rmserve score`` reads) or
of preference pairs (TRL convention: ``chosen`` / ``rejected``, optionally ``prompt``), in which case
both responses of every pair are scored.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from rmserve.batching.planning import BatchLimits, plan_offline
from rmserve.config import LoadOptions
from rmserve.models.ensemble import (
    Calibration,
    EnsembleConfig,
    EnsembleRewardModel,
    Member,
    read_ensemble_config,
    write_ensemble_config,
)
from rmserve.models.inputs import RewardInput
from rmserve.names import DTypeName
from rmserve.scoring.offline import read_inputs
from rmserve.training.pairs import read_preference_pairs


def _first_record(path: Path) -> dict[str, object]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                return record if isinstance(record, dict) else {}
    raise ValueError(f"{path} is empty; give a JSONL file of inputs or preference pairs.")


def read_reference_inputs(path: Path, limit: int | None = None) -> list[RewardInput]:
    """The inputs of a reference set: an inputs JSONL, or both responses of each preference pair.

    Args:
        path: the JSONL(.gz) file.
        limit: keep the first ``limit`` inputs (pairs give two each).

    Raises:
        ValueError: the file is missing, empty or malformed (the message names the line).
    """
    if not path.is_file():
        raise ValueError(f"reference set {path} does not exist.")
    if "chosen" in _first_record(path):
        inputs = [x for pair in read_preference_pairs(path) for x in (pair.chosen, pair.rejected)]
    else:
        if path.suffix == ".gz":
            raise ValueError(
                f"{path}: an inputs file must be plain JSONL (only preference pairs may be .gz)."
            )
        inputs, _ = read_inputs(path)
    return inputs[:limit] if limit is not None else inputs


def create_ensemble(
    out: Path, members: Sequence[tuple[str, Path]], *, nominal_member: int = 0, reward: str = "mean"
) -> Path:
    """Write an (uncalibrated) ensemble folder naming ``members`` as (name, folder) pairs.

    Raises:
        ValueError: a member folder does not exist, or the names/nominal member are invalid.
    """
    for name, folder in members:
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"member {name!r}: {folder} is not a Hugging Face model folder (no config.json)."
            )
    config = EnsembleConfig.model_validate(
        {
            "members": [{"name": n, "path": str(f.expanduser().resolve())} for n, f in members],
            "nominal_member": nominal_member,
            "reward": reward,
        }
    )
    return write_ensemble_config(out, config)


def member_statistics(rewards: torch.Tensor) -> list[tuple[float, float]]:
    """Mean and population std of each column of (N, k) rewards, in float64.

    Raises:
        ValueError: fewer than two inputs, or a member gives the same reward to every input.
    """
    if rewards.shape[0] < 2:
        raise ValueError("calibration needs at least 2 reference inputs.")
    values = rewards.double()  # (N, k)
    mean = values.mean(dim=0)  # (k,)
    std = values.std(dim=0, correction=0)  # (k,)
    return [(float(m), float(s)) for m, s in zip(mean, std, strict=True)]


def calibrate(
    path: Path,
    inputs: Sequence[RewardInput],
    *,
    data_name: str,
    dtype: DTypeName = "auto",
    device: str = "auto",
    max_batch_tokens: int = 8192,
    max_batch_size: int = 64,
    progress: bool = True,
) -> EnsembleConfig:
    """Score ``inputs`` with every member and store each member's calibration in ``path``.

    Returns:
        The updated descriptor (also written to ``path / rmserve.json``).

    Raises:
        ValueError: the ensemble or a member cannot be loaded, or a member's rewards are constant.
    """
    config = read_ensemble_config(path)
    model = EnsembleRewardModel(
        "calibration",
        path,
        LoadOptions(dtype=dtype, device=device, kernels="reference"),
        require_calibration=False,
    )
    encoded = model.new_encoder(min(model.info.max_length, max_batch_tokens)).encode_many(inputs, "left")
    limits = BatchLimits(max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size)
    rewards = torch.empty(len(encoded), len(model.members))  # (N, k)
    with tqdm(total=sum(map(len, encoded)), unit="tok", disable=not progress, desc="calibrating") as bar:
        for batch in plan_offline([len(e) for e in encoded], limits):
            rewards[batch] = model.raw_member_rewards([encoded[i] for i in batch])
            bar.update(sum(len(encoded[i]) for i in batch))
    stats = member_statistics(rewards)
    members = []
    for member, (mean, std) in zip(config.members, stats, strict=True):
        if not std > 0:
            raise ValueError(
                f"member {member.name!r} gave every reference input the same reward ({mean}); it cannot be "
                "calibrated: check its score head, or use a more varied reference set."
            )
        calibration = Calibration(mean=mean, std=std, inputs=len(encoded), data=data_name)
        members.append(Member(name=member.name, path=member.path, calibration=calibration))
    updated = config.model_copy(update={"members": tuple(members)})
    write_ensemble_config(path, updated)
    return updated
