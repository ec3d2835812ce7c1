"""Request and response bodies of the HTTP API (pydantic models only)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rmserve.models.inputs import INPUT_FORMS_HELP, ScoreInput


class ScoreRequest(BaseModel):
    """``POST /v1/score``."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model name (GET /v1/models); the default model when absent.")
    inputs: list[ScoreInput] = Field(min_length=1, description=f"Inputs to score; {INPUT_FORMS_HELP}.")
    truncation: Literal["left", "right", "error"] | None = Field(
        None,
        description="Over-long inputs: left keeps the end (scored part), right keeps the start, error refuses "
        "with 422. Default: the model's configured policy (left unless configured otherwise).",
    )


class Usage(BaseModel):
    input_tokens: int = Field(description="Tokens scored, after truncation.")


class ScoreResponse(BaseModel):
    """Rewards in input order (raw logits, no sigmoid)."""

    model: str
    rewards: list[float]
    truncated: list[bool] = Field(description="Per input: whether tokens were dropped to fit max_length.")
    usage: Usage


class ModelCard(BaseModel):
    id: str = Field(description="The model's name, as requests give it.")
    object: Literal["model"] = "model"
    kind: str
    architecture: str
    dtype: str
    device: str
    max_length: int
    parameters: int
    default: bool = Field(description="Whether requests without 'model' go to this model.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Status(BaseModel):
    status: str
    detail: str | None = None


class ErrorBody(BaseModel):
    type: str = Field(description="A stable error kind, e.g. invalid_input, model_not_found, overloaded.")
    message: str = Field(description="What went wrong and how to fix it.")


class ErrorResponse(BaseModel):
    error: ErrorBody
