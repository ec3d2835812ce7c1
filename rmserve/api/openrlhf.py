"""OpenRLHF's remote reward-model protocol: its schema and its route.

``POST /get_reward`` with ``{"query": [full texts], "prompts": [...],
"labels": [...]}`` -> ``{"rewards": [...], "scores": [...], "extra_logs": {...}}``. Each query is
scored as already formatted text (the ``text`` input form), after removing the pad tokens a
trainer's batch padding left around it (``strip_padding``). ``prompts`` and ``labels`` are accepted (checked
for length) and not used: a reward model scores the whole text. ``extra_logs`` carries, for models
with several heads, every aggregate and each head (``head/<name>``), so they reach the trainer's
logs. OpenRLHF sends one query per request from many concurrent workers: the batcher turns them
into full batches. With several reward URLs it splits each batch across them and sends
``{"query": []}`` to the servers left without a share: that is answered 200 with empty lists (and the
same ``extra_logs`` keys as any other answer), never an error that would cost the run its rewards.

The reward is the model's configured aggregate (its ``reward`` in ``GET /v1/models``), with the
model's default lambdas. A full queue makes the request wait for room (up to the request timeout) instead
of answering 429: OpenRLHF retries any error five times, one second apart, then crashes the step.

A server with API keys answers OpenRLHF, which sends no headers, at ``/key/<key>/get_reward``
(``rmserve.api.middleware``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rmserve.api.deps import ERROR_RESPONSES, build_inputs, resolve_model, score_request, set_timing_headers
from rmserve.names import AGGREGATES

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
async def get_reward(body: OpenRLHFRequest, request: Request, response: Response) -> OpenRLHFResponse:
    """OpenRLHF's remote reward model protocol."""
    served = resolve_model(request, body.model)
    multi = len(served.info.heads) > 1
    if not body.query:
        request.scope["state"]["input_tokens"] = 0
        set_timing_headers(request, response, 0.0, 0.0, 0.0)
        keys = [*AGGREGATES, *(f"head/{name}" for name in served.info.heads)] if multi else []
        return OpenRLHFResponse(rewards=[], scores=[], extra_logs={key: [] for key in keys})
    pad, eos = served.special_texts
    inputs = build_inputs("query", [{"text": strip_padding(q, pad, eos)} for q in body.query])
    outcome = await score_request(
        request,
        response,
        served,
        inputs,
        aggregates=list(AGGREGATES) if multi else [],
        return_heads=multi,
        wait_for_room=True,
    )
    logs: dict[str, list[float]] = dict(outcome.aggregates)
    if multi and outcome.heads is not None:
        for index, name in enumerate(served.info.heads):
            logs[f"head/{name}"] = [row[index] for row in outcome.heads]
    return OpenRLHFResponse(rewards=outcome.rewards, scores=outcome.rewards, extra_logs=logs)
