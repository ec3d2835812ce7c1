"""The endpoints RLHF trainers already speak: their request/response schemas and routes.

- OpenRLHF's remote reward model: ``POST /get_reward`` with ``{"query": [full texts], "prompts": [...],
  "labels": [...]}`` -> ``{"rewards": [...], "scores": [...], "extra_logs": {...}}``. Each query is
  scored as already formatted text (the ``text`` input form), after removing the pad tokens a
  trainer's batch padding left around it (``strip_padding``). ``prompts`` and ``labels`` are accepted (checked
  for length) and not used: a reward model scores the whole text. ``extra_logs`` carries, for models
  with several heads, every aggregate and each head (``head/<name>``), so they reach the trainer's
  logs. OpenRLHF sends one query per request from many concurrent workers: the batcher turns them
  into full batches. With several reward URLs it splits each batch across them and sends
  ``{"query": []}`` to the servers left without a share: that is answered 200 with empty lists (and the
  same ``extra_logs`` keys as any other answer), never an error that would cost the run its rewards.
- vLLM's pooling API for reward models: ``POST /classify`` (and ``/v1/classify``) and ``POST /pooling``
  (and ``/v1/pooling``). ``input`` is a string, a list of strings, a list of token ids or a list of
  such lists; ``use_activation`` / ``activation`` (default false: raw logits, as verl's reward loop
  asks) applies the sigmoid; ``truncate_prompt_tokens`` keeps the last N tokens (-1: the model's
  limit). ``/classify`` answers ``data[i].probs = [reward]`` (verl reads ``data[-1].probs[-1]``);
  ``/pooling`` answers ``data[i].data = [reward]``.

The reward is the model's configured aggregate (its ``reward`` in ``GET /v1/models``), with the
model's default lambdas.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rmserve.aggregation import AGGREGATES
from rmserve.api.errors import ApiError, from_domain
from rmserve.api.routes import (
    ERROR_RESPONSES,
    ClientDisconnected,
    check_input_count,
    registry_of,
    until_disconnect,
)
from rmserve.models.inputs import INPUT_ADAPTER, RewardInput
from rmserve.serving import ScoreOutcome, ServedModel

router = APIRouter()


class OpenRLHFRequest(BaseModel):
    """OpenRLHF's remote reward-model request."""

    model_config = ConfigDict(extra="allow")

    query: list[str] = Field(
        description="Full texts (prompt and response, formatted); may be empty (OpenRLHF with several URLs)."
    )
    prompts: list[str] | None = Field(None, description="The prompts (accepted, not used for scoring).")
    labels: list[Any] | None = Field(None, description="Reference labels (accepted, not used).")
    model: str | None = Field(None, description="rmserve extension: the model (default: the default model).")

    @model_validator(mode="after")
    def _lengths(self) -> OpenRLHFRequest:
        for name in ("prompts", "labels"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.query):
                raise ValueError(
                    f"{name} has {len(value)} entries but query has {len(self.query)}; send one per query."
                )
        return self


class OpenRLHFResponse(BaseModel):
    rewards: list[float]
    scores: list[float] = Field(description="The same values as rewards.")
    extra_logs: dict[str, list[float]] = Field(
        description="Aggregates and per-head rewards of multi-head models."
    )


VllmInput = str | list[str] | list[int] | list[list[int]]


class VllmRequest(BaseModel):
    """vLLM's classify / pooling request, as far as a reward model uses it."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: VllmInput = Field(description="A text, a list of texts, token ids, or a list of token-id lists.")
    use_activation: bool | None = Field(None, description="Apply the sigmoid (default false: raw reward).")
    activation: bool | None = Field(None, description="Older name of use_activation.")
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="Keep the last N tokens; -1: the model's limit."
    )

    @model_validator(mode="after")
    def _non_empty(self) -> VllmRequest:
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input is an empty list; send at least one text or token-id list.")
        if self.truncate_prompt_tokens == 0:
            raise ValueError("truncate_prompt_tokens must be -1 (the model's limit) or at least 1.")
        return self


class VllmUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None


class ClassificationData(BaseModel):
    index: int
    label: str = "reward"
    probs: list[float]
    num_classes: int = 1


class ClassificationResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: VllmUsage


class PoolingData(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float]


class PoolingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: VllmUsage


async def _score(
    request: Request, model: str | None, inputs: list[RewardInput], **options: Any
) -> tuple[ServedModel, ScoreOutcome]:
    """Score through the served model, mapping domain errors to HTTP errors."""
    registry = registry_of(request)
    try:
        served = registry.get(model)
        request.scope["state"]["model"] = served.name
        check_input_count(request, len(inputs))
        outcome = await until_disconnect(request, served.score(inputs, **options))
        request.scope["state"]["input_tokens"] = outcome.input_tokens
    except ClientDisconnected:
        raise
    except Exception as exc:
        raise from_domain(exc) from exc
    return served, outcome


def strip_padding(text: str, pad: str | None, eos: str | None) -> str:
    """Remove the pad tokens a trainer's batch padding left around a decoded query.

    Leading and trailing pad strings go; when the pad token is also EOS, one trailing EOS stays (the
    sequence ended there), as OpenRLHF's own server re-appends it.
    """
    if not pad:
        return text
    out = text
    while out.startswith(pad):
        out = out[len(pad) :]
    end = out
    while end.endswith(pad):
        end = end[: -len(pad)]
    if pad == eos and end != out:
        end += eos
    return end


@router.post("/get_reward", response_model=OpenRLHFResponse, responses=ERROR_RESPONSES)
async def get_reward(body: OpenRLHFRequest, request: Request) -> OpenRLHFResponse | Response:
    """OpenRLHF's remote reward model protocol."""
    registry = registry_of(request)
    try:
        served = registry.get(body.model)
    except Exception as exc:
        raise from_domain(exc) from exc
    multi = len(served.info.heads) > 1
    if not body.query:
        request.scope["state"]["model"] = served.name
        request.scope["state"]["input_tokens"] = 0
        keys = [*AGGREGATES, *(f"head/{name}" for name in served.info.heads)] if multi else []
        return OpenRLHFResponse(rewards=[], scores=[], extra_logs={key: [] for key in keys})
    pad, eos = served.special_texts
    inputs = _build("query", [{"text": strip_padding(q, pad, eos)} for q in body.query])
    try:
        _, outcome = await _score(
            request, body.model, inputs, aggregates=list(AGGREGATES) if multi else [], return_heads=multi
        )
    except ClientDisconnected:
        return Response(status_code=499)
    logs: dict[str, list[float]] = dict(outcome.aggregates)
    if multi and outcome.heads is not None:
        for index, name in enumerate(served.info.heads):
            logs[f"head/{name}"] = [row[index] for row in outcome.heads]
    return OpenRLHFResponse(rewards=outcome.rewards, scores=outcome.rewards, extra_logs=logs)


def _build(field: str, raw: list[dict[str, Any]]) -> list[RewardInput]:
    """Reward inputs from their plain forms; a bad one is a 422 naming ``field[index]``."""
    out = []
    for index, item in enumerate(raw):
        try:
            out.append(INPUT_ADAPTER.validate_python(item))
        except ValidationError as exc:
            problem = exc.errors()[0]
            raise ApiError(
                422,
                "invalid_request",
                f"{field}[{index}]: {problem['msg']}; send a non-empty text or valid token ids.",
            ) from None
    return out


def _vllm_inputs(value: VllmInput) -> list[RewardInput]:
    if isinstance(value, str):
        return _build("input", [{"text": value}])
    if all(isinstance(v, int) for v in value):
        return _build("input", [{"input_ids": value}])
    if all(isinstance(v, str) for v in value):
        return _build("input", [{"text": v} for v in value])
    return _build("input", [{"input_ids": v} for v in value])


async def _vllm(body: VllmRequest, request: Request) -> tuple[ServedModel, ScoreOutcome, list[float]]:
    limit = None if body.truncate_prompt_tokens in (None, -1) else body.truncate_prompt_tokens
    truncation = "left" if body.truncate_prompt_tokens is not None else None
    served, outcome = await _score(
        request, body.model, _vllm_inputs(body.input), truncation=truncation, max_tokens=limit
    )
    activate = body.use_activation if body.use_activation is not None else bool(body.activation)
    values = [1 / (1 + math.exp(-r)) if activate else r for r in outcome.rewards]
    return served, outcome, values


@router.post("/classify", response_model=ClassificationResponse, responses=ERROR_RESPONSES)
@router.post(
    "/v1/classify", response_model=ClassificationResponse, responses=ERROR_RESPONSES, include_in_schema=False
)
async def classify(body: VllmRequest, request: Request) -> ClassificationResponse | Response:
    """vLLM-compatible classification: one class, the reward (raw unless use_activation)."""
    try:
        served, outcome, values = await _vllm(body, request)
    except ClientDisconnected:
        return Response(status_code=499)
    usage = VllmUsage(prompt_tokens=outcome.input_tokens, total_tokens=outcome.input_tokens)
    data = [ClassificationData(index=i, probs=[v]) for i, v in enumerate(values)]
    return ClassificationResponse(
        id=f"classify-{uuid.uuid4().hex}", created=int(time.time()), model=served.name, data=data, usage=usage
    )


@router.post("/pooling", response_model=PoolingResponse, responses=ERROR_RESPONSES)
@router.post(
    "/v1/pooling", response_model=PoolingResponse, responses=ERROR_RESPONSES, include_in_schema=False
)
async def pooling(body: VllmRequest, request: Request) -> PoolingResponse | Response:
    """vLLM-compatible pooling for reward models: each input's reward as a one-element vector."""
    try:
        served, outcome, values = await _vllm(body, request)
    except ClientDisconnected:
        return Response(status_code=499)
    usage = VllmUsage(prompt_tokens=outcome.input_tokens, total_tokens=outcome.input_tokens)
    data = [PoolingData(index=i, data=[v]) for i, v in enumerate(values)]
    return PoolingResponse(
        id=f"pool-{uuid.uuid4().hex}", created=int(time.time()), model=served.name, data=data, usage=usage
    )
