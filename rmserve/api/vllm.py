"""vLLM's pooling API for reward models (what verl's reward loop calls): its schema and its routes.

``POST /classify`` (and ``/v1/classify``) and ``POST /pooling``
(and ``/v1/pooling``). ``input`` is a string, a list of strings, a list of token ids or a list of
such lists; ``use_activation`` / ``activation`` (default false: raw logits, as verl's reward loop
asks) applies the sigmoid; ``truncate_prompt_tokens`` keeps the last N tokens (-1: the model's
limit). ``/classify`` answers ``data[i].probs = [reward]`` (verl reads ``data[-1].probs[-1]``);
``/pooling`` answers ``data[i].data = [reward]``.

A ``/classify`` body with ``text`` or ``input_ids`` and no ``input`` is SGLang's native request: it is
answered in SGLang's shape (``rmserve.api.sglang``).

The reward is the model's configured aggregate (its ``reward`` in ``GET /v1/models``), with the
model's default lambdas. A full queue makes these requests wait for room (up to the request timeout)
instead of answering 429: verl retries only 5xx.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Body, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rmserve.api.deps import ERROR_RESPONSES, resolve_model, score_request
from rmserve.api.sglang import SglangClassifyRequest, TokenInput, sglang_classify, token_inputs
from rmserve.scoring.scorer import ScoreOutcome, ServedModel

router = APIRouter()


VllmInput = TokenInput
M = TypeVar("M", bound=BaseModel)


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
    body: VllmRequest, request: Request, response: Response
) -> tuple[ServedModel, ScoreOutcome, list[float]]:
    served = resolve_model(request, body.model)
    limit = None if body.truncate_prompt_tokens in (None, -1) else body.truncate_prompt_tokens
    truncation = "left" if body.truncate_prompt_tokens is not None else None
    outcome = await score_request(
        request,
        response,
        served,
        token_inputs("input", body.input),
        truncation=truncation,
        max_tokens=limit,
        wait_for_room=True,
    )
    activate = body.use_activation if body.use_activation is not None else bool(body.activation)
    values = [1 / (1 + math.exp(-r)) if activate else r for r in outcome.rewards]
    return served, outcome, values


def _validated(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


@router.post("/classify", response_model=None, responses=ERROR_RESPONSES)
@router.post("/v1/classify", response_model=None, responses=ERROR_RESPONSES, include_in_schema=False)
async def classify(
    request: Request,
    response: Response,
    body: Annotated[
        dict[str, Any],
        Body(
            description="vLLM's {'input': ...} (answered in vLLM's shape) or SGLang's {'text' | 'input_ids': ...}."
        ),
    ],
) -> ClassificationResponse | Any:
    """vLLM-compatible classification: one class, the reward (raw unless use_activation); a body with
    ``text`` or ``input_ids`` instead of ``input`` is SGLang's native request, answered in SGLang's shape."""
    if "input" not in body and ("text" in body or "input_ids" in body):
        return await sglang_classify(_validated(SglangClassifyRequest, body), request, response)
    return await _classify(_validated(VllmRequest, body), request, response)


async def _classify(body: VllmRequest, request: Request, response: Response) -> ClassificationResponse:
    served, outcome, values = await _score(body, request, response)
    usage = VllmUsage(prompt_tokens=outcome.input_tokens, total_tokens=outcome.input_tokens)
    data = [ClassificationData(index=i, probs=[v]) for i, v in enumerate(values)]
    return ClassificationResponse(
        id=f"classify-{uuid.uuid4().hex}", created=int(time.time()), model=served.name, data=data, usage=usage
    )


@router.post("/pooling", response_model=PoolingResponse, responses=ERROR_RESPONSES)
@router.post(
    "/v1/pooling", response_model=PoolingResponse, responses=ERROR_RESPONSES, include_in_schema=False
)
async def pooling(body: VllmRequest, request: Request, response: Response) -> PoolingResponse:
    """vLLM-compatible pooling for reward models: each input's reward as a one-element vector."""
    served, outcome, values = await _score(body, request, response)
    usage = VllmUsage(prompt_tokens=outcome.input_tokens, total_tokens=outcome.input_tokens)
    data = [PoolingData(index=i, data=[v]) for i, v in enumerate(values)]
    return PoolingResponse(
        id=f"pool-{uuid.uuid4().hex}", created=int(time.time()), model=served.name, data=data, usage=usage
    )
