"""Ensembles of separate reward models (kind ``ensemble``), heterologous reward fusion included.

Every member (a dense reward-model folder: any architecture, any tokenizer) scores every input with
its own tokenizer and its own forward. Raw member rewards live on different scales, so each member's
reward is calibrated before aggregation, as BRME's heterologous fusion does (appendix F):
``(r_m - mean_m) / std_m``, with the mean and the population std of the member's rewards over a
reference set, computed once by ``rmserve calibrate`` and stored in the folder. The calibrated member
rewards are the heads; the nominal member is configured (default the first).

On disk an ensemble is a folder holding only ``rmserve.json``::

    {"kind": "ensemble",
     "members": [{"name": "rm-a", "path": "/models/rm-a", "calibration": {"mean": 0.1, "std": 2.3, ...}},
                 {"name": "rm-b", "path": "../rm-b", "calibration": null}],
     "nominal_member": 0, "reward": "mean", "uwo_lambda": 1.0, "tradeoff_lambda": 0.6}

Member paths are absolute or relative to the ensemble folder. A member without calibration cannot
be served: run ``rmserve calibrate``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rmserve.aggregation import AggregationParams, aggregate_rows
from rmserve.batching.prefix import PrefixPlan
from rmserve.config import LoadOptions
from rmserve.models.base import MetaPart, ModelInfo, refuse_plan
from rmserve.models.dense import DenseRewardModel
from rmserve.models.descriptor import DESCRIPTOR, read_descriptor
from rmserve.models.inputs import EncodedInput, InputEncoder, InputError, RewardInput
from rmserve.names import AggregateName, Truncation
from rmserve_kernels.heads import HeadOutputs

MEMBER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"


class Calibration(BaseModel):
    """A member's reward statistics over a reference set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mean: float = Field(allow_inf_nan=False)
    std: float = Field(gt=0, allow_inf_nan=False, description="Population std of the member's rewards.")
    inputs: int | None = Field(None, ge=1, description="How many reference inputs were scored.")
    data: str | None = Field(None, description="The reference set it was computed on.")


class Member(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=MEMBER_NAME)
    path: str = Field(
        min_length=1, description="Dense reward-model folder, absolute or relative to the ensemble."
    )
    calibration: Calibration | None = None


class EnsembleConfig(BaseModel):
    """``rmserve.json`` of an ensemble folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["ensemble"] = "ensemble"
    members: tuple[Member, ...] = Field(min_length=1)
    nominal_member: int = Field(0, ge=0)
    reward: AggregateName = "mean"
    uwo_lambda: float = Field(1.0, ge=0, allow_inf_nan=False)
    tradeoff_lambda: float = Field(0.6, ge=0, le=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _valid(self) -> EnsembleConfig:
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}.")
        if self.nominal_member >= len(self.members):
            raise ValueError(
                f"nominal_member={self.nominal_member} but there are {len(self.members)} members."
            )
        return self


def read_ensemble_config(path: Path) -> EnsembleConfig:
    """Parse an ensemble folder's ``rmserve.json``.

    Raises:
        ValueError: the file is missing or invalid (the message says which field).
    """
    return read_descriptor(path, EnsembleConfig, "ensemble", "create the ensemble with rmserve ensemble")


def write_ensemble_config(path: Path, config: EnsembleConfig) -> Path:
    """Write ``rmserve.json`` atomically (a rename), creating the folder."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{DESCRIPTOR}.tmp"
    tmp.write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(path / DESCRIPTOR)
    return path


def member_path(ensemble: Path, member: Member) -> Path:
    """A member's folder, resolved against the ensemble folder."""
    return (ensemble / Path(member.path).expanduser()).resolve()


def member_poolings(members: Sequence[Member], poolings: Sequence[str]) -> str:
    """The ensemble's pooling in ``/v1/models``: the members' common rule, else each member's."""
    if len(set(poolings)) == 1:
        return poolings[0]
    return ", ".join(f"{m.name}: {p}" for m, p in zip(members, poolings, strict=True))


@dataclass(frozen=True, slots=True)
class MemberInputs:
    """One input, tokenised by every member's tokenizer (member order).

    ``len`` is the longest member encoding: the batcher's padded-token budget then bounds every
    member's forward.
    """

    parts: tuple[EncodedInput, ...]

    @property
    def truncated(self) -> bool:
        return any(p.truncated for p in self.parts)

    def __len__(self) -> int:
        return max(len(p) for p in self.parts)


class EnsembleEncoder:
    """Encodes each input once per member, with each member's own tokenizer and limit.

    ``max_length`` is the largest member limit: an input is truncated for a member only past that
    member's own limit, and reported truncated if any member truncated it.
    """

    def __init__(self, encoders: Sequence[InputEncoder]) -> None:
        self.encoders = list(encoders)
        self.max_length = max(e.max_length for e in self.encoders)  # each member truncates to its own

    def encode_many(
        self, items: Sequence[RewardInput], truncation: Truncation = "left", limit: int | None = None
    ) -> list[MemberInputs]:
        """Encode inputs for every member; an error names the input and the member's limit."""
        per_member = []
        for encoder in self.encoders:
            try:
                per_member.append(encoder.encode_many(items, truncation, limit))
            except InputError as exc:
                raise InputError(f"{exc} (ensemble member limit: {encoder.max_length} tokens)") from None
        return [MemberInputs(tuple(parts)) for parts in zip(*per_member, strict=True)]


class EnsembleRewardModel:
    """An ensemble folder loaded for serving: every member loaded as a dense model.

    Args:
        name: the name requests use to pick this model.
        path: the ensemble folder.
        dtype, device, kernels: applied to every member.
        max_length: the most tokens per input for every member (default: each member's own limit).
        require_calibration: refuse members without calibration (off only for ``rmserve calibrate``).
        quantize: ``none``, ``int8`` or ``nf4`` for every member; the calibration (measured on the
            members as stored) is applied unchanged.
        pooling: ``hf`` or ``last`` for every member; None: each member folder's own declaration, else
            ``hf``. The calibration was measured with each member's own rule.

    Raises:
        ValueError: the descriptor or a member is invalid, or a member is not calibrated.
    """

    kind = "ensemble"

    def __init__(
        self,
        name: str,
        path: str | Path,
        options: LoadOptions = LoadOptions(),
        *,
        require_calibration: bool = True,
    ) -> None:
        path = Path(path)
        self.path = path
        self.config = config = read_ensemble_config(path)
        missing = [m.name for m in config.members if m.calibration is None]
        if missing and require_calibration:
            raise ValueError(
                f"ensemble {path}: members {', '.join(missing)} have no calibration, so their rewards cannot be "
                f"put on one scale; run: rmserve calibrate {path} --data REFERENCE.jsonl"
            )
        # each member at its own token limit; the ensemble's limit caps what the encoders accept
        member_options = dataclasses.replace(options, kind="auto", max_length=None)
        self.members = []
        for member in config.members:
            folder = member_path(path, member)
            try:
                model = DenseRewardModel(f"{name}/{member.name}", folder, member_options)
            except ValueError as exc:
                raise ValueError(f"ensemble {path}, member {member.name!r}: {exc}") from None
            self.members.append(model)
        stats = [m.calibration or Calibration(mean=0.0, std=1.0) for m in config.members]
        self.shift = torch.tensor([c.mean for c in stats], dtype=torch.float64)  # (k,)
        self.scale = torch.tensor([c.std for c in stats], dtype=torch.float64)  # (k,)
        first = self.members[0].info
        self.info = ModelInfo(
            name=name,
            kind=self.kind,
            architecture=" + ".join(m.info.architecture for m in self.members),
            dtype=first.dtype,
            device=first.device,
            max_length=min(
                [max(m.max_length for m in self.members)]
                + ([options.max_length] if options.max_length else [])
            ),
            parameters=sum(m.info.parameters for m in self.members),
            path=str(path),
            weights_bytes=sum(m.info.weights_bytes for m in self.members),
            quantize=first.quantize,
            compiled=first.compiled,
            pooling=member_poolings(config.members, [m.pooling.name for m in self.members]),
            heads=tuple(m.name for m in config.members),
            has_std=False,
            nominal_head=config.nominal_member,
            reward=config.reward,
            defaults=AggregationParams(config.uwo_lambda, config.tradeoff_lambda),
        )

    @classmethod
    def meta_parts(cls, path: Path, options: LoadOptions) -> list[MetaPart]:
        """Every member's classifier on meta, each at its own token limit capped by ``max_length``."""
        member_options = dataclasses.replace(options, kind="auto", max_length=None)
        parts = []
        for member in read_ensemble_config(path).members:
            (part,) = DenseRewardModel.meta_parts(member_path(path, member), member_options)
            limit = (
                part.max_length if options.max_length is None else min(options.max_length, part.max_length)
            )
            parts.append(dataclasses.replace(part, max_length=limit))
        return parts

    def new_encoder(self, max_length: int | None = None) -> EnsembleEncoder:
        """Per-member encoders, each limited to ``max_length`` tokens if given."""
        return EnsembleEncoder([m.new_encoder(max_length) for m in self.members])

    def raw_member_rewards(self, batch: Sequence[MemberInputs]) -> torch.Tensor:
        """Every member's uncalibrated reward, (B, k) float32: one forward per member."""
        columns = []
        for index, member in enumerate(self.members):
            parts = [item.parts[index] for item in batch]
            zeros = torch.zeros(len(parts))  # (B,) the members' own aggregates are not used
            out = member.score(parts, uwo_lambda=zeros, tradeoff_lambda=zeros)
            columns.append(out.heads[:, 0])  # (B,)
        return torch.stack(columns, dim=-1)  # (B, k)

    def score(
        self,
        batch: Sequence[MemberInputs],
        *,
        uwo_lambda: torch.Tensor,
        tradeoff_lambda: torch.Tensor,
        plan: PrefixPlan | None = None,
    ) -> HeadOutputs:
        """Calibrated member rewards as heads, with every aggregate, in batch order, on the CPU.

        Aggregation of the (B, k) member rewards uses the torch reference on every device: it is
        negligible next to k full forwards, so there is nothing for a kernel to fuse. Members tokenise
        apart, so there is no one prefix to share (``plan`` must be None).
        """
        refuse_plan(self.info, plan)
        raw = self.raw_member_rewards(batch)  # (B, k)
        heads = ((raw.double() - self.shift) / self.scale).float()  # (B, k)
        nominal = torch.full((len(batch),), self.config.nominal_member, dtype=torch.long)  # (B,)
        return HeadOutputs(heads, None, aggregate_rows(heads, nominal, uwo_lambda, tradeoff_lambda))
