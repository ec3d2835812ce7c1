"""SGLang's reward-model protocols: OpenAI-style ``POST /v1/embeddings`` and the native ``/classify`` body.

- ``POST /v1/embeddings`` with ``{"model", "input"}`` (what verl's reward loop sends an SGLang reward
  server; it reads ``data[-1].embedding[-1]``): each input's reward as a one-element embedding, in the
  OpenAI embeddings response shape; ``encoding_format`` ``float`` (default) or ``base64`` (little-endian
  float32, what OpenAI's client asks by default); ``dimensions``, when given, must be 1.
- SGLang's native ``/classify`` body ``{"text": ...}`` or ``{"input_ids": ...}`` (routed here by
  ``rmserve.api.vllm``'s ``/classify``, which takes vLLM's ``{"input": ...}``): one text or id list gets one
  object ``{"embedding": [reward], "meta_info": {...}}``, a list gets a list of them, as SGLang answers.

``input`` and ``text`` are already formatted texts (chat template applied), ``input_ids`` token ids; the
reward is the model's configured aggregate (its ``reward`` in ``GET /v1/models``), raw (no activation),
with the model's default lambdas. Both routes wait for room in a full queue instead of answering 429
(their callers retry only 5xx).
"""

from __future__ import annotations

import base64
import struct
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rmserve.api.deps import ERROR_RESPONSES, build_inputs, resolve_model, score_request
from rmserve.models.inputs import RewardInput

router = APIRouter()

TokenInput = str | list[str] | list[int] | list[list[int]]


def token_inputs(field: str, value: TokenInput) -> list[RewardInput]:
    """Reward inputs from a text, texts, token ids or token-id lists (a 422 names ``field[index]``)."""
    if isinstance(value, str):
        return build_inputs(field, [{"text": value}])
    if all(isinstance(v, int) for v in value):
        return build_inputs(field, [{"input_ids": value}])
    if all(isinstance(v, str) for v in value):
        return build_inputs(field, [{"text": v} for v in value])
    return build_inputs(field, [{"input_ids": v} for v in value])


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, as SGLang serves it for reward models."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="The model (default: the default model).")
    input: TokenInput = Field(description="A text, a list of texts, token ids, or a list of token-id lists.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="Must be 1 when given: the reward is one number.")
    user: str | None = None

    @model_validator(mode="after")
    def _check(self) -> EmbeddingRequest:
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input is an empty list; send at least one text or token-id list.")
        if self.dimensions not in (None, 1):
            raise ValueError(
                f"dimensions is {self.dimensions}, but a reward is one number; send 1 or leave it out."
            )
        return self


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="[reward], or its float32 bytes in base64.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
async def embeddings(body: EmbeddingRequest, request: Request, response: Response) -> EmbeddingResponse:
    """SGLang-compatible reward as an embedding: each input's reward as a one-element vector."""
    served = resolve_model(request, body.model)
    outcome = await score_request(
        request, response, served, token_inputs("input", body.input), wait_for_room=True
    )
    data = [
        EmbeddingData(
            index=i,
            embedding=[r]
            if body.encoding_format == "float"
            else base64.b64encode(struct.pack("<f", r)).decode(),
        )
        for i, r in enumerate(outcome.rewards)
    ]
    usage = EmbeddingUsage(prompt_tokens=outcome.input_tokens, total_tokens=outcome.input_tokens)
    return EmbeddingResponse(data=data, model=served.name, usage=usage)


class SglangClassifyRequest(BaseModel):
    """SGLang's native ``/classify`` request (``EmbeddingReqInput``), as far as a text reward model uses it."""

    model_config = ConfigDict(extra="allow")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    model: str | None = Field(None, description="rmserve extension: the model (default: the default model).")
    rid: str | list[str] | None = None
    image_data: Any = None
    lora_path: Any = None

    @model_validator(mode="after")
    def _check(self) -> SglangClassifyRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("send either text or input_ids (not both, not neither).")
        value = self.value
        if isinstance(value, list) and not value:
            raise ValueError("the input is an empty list; send at least one text or token-id list.")
        for name in ("image_data", "lora_path"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is not supported by a text reward model; leave it out.")
        count = len(value) if self.batched and isinstance(value, list) else 1
        if isinstance(self.rid, list) and len(self.rid) != count:
            raise ValueError(f"rid has {len(self.rid)} entries for {count} inputs; send one per input.")
        return self

    @property
    def value(self) -> TokenInput:
        """The inputs: ``text`` or ``input_ids``, whichever was sent (``_check`` ensured one)."""
        if self.text is not None:
            return self.text
        return self.input_ids or []

    @property
    def batched(self) -> bool:
        """A list of inputs (answered with a list), not a single one."""
        if self.text is not None:
            return isinstance(self.text, list)
        ids = self.input_ids or []
        return bool(ids) and isinstance(ids[0], list)


async def sglang_classify(body: SglangClassifyRequest, request: Request, response: Response) -> Any:
    """SGLang's native classify answer: ``{"embedding": [reward], "meta_info": ...}`` per input."""
    served = resolve_model(request, body.model)
    field = "text" if body.text is not None else "input_ids"
    outcome = await score_request(
        request, response, served, token_inputs(field, body.value), wait_for_room=True
    )
    lengths = outcome.input_lengths or [0] * len(outcome.rewards)
    rids = body.rid if isinstance(body.rid, list) else [body.rid] * len(outcome.rewards)
    answers = [
        {
            "embedding": [reward],
            "meta_info": {
                "id": rid or uuid.uuid4().hex,
                "prompt_tokens": n,
                "finish_reason": {"type": "length", "length": 0},
            },
        }
        for reward, n, rid in zip(outcome.rewards, lengths, rids, strict=True)
    ]
    return answers if body.batched else answers[0]
