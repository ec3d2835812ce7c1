"""What the client returns (``ScoreResult``, ``ModelInfo``) and the server's JSON bodies it parses.

The wire models ignore fields they do not know, so a newer server stays readable by this client.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ScoreResult(BaseModel):
    """Rewards of one call, every list in input order (one entry per input).

    Attributes:
        model: the model that scored (empty for an empty batch that named no model: no request was made).
        reward: what ``rewards`` holds: an aggregate (e.g. ``mean``), or ``combined`` (a dmoerm model's own
            reward); empty for an empty batch.
        rewards: one reward per input (raw logits, no sigmoid).
        aggregates: the requested aggregates, columnar: name -> one value per input.
        heads: with ``return_heads``: each input's head rewards; None otherwise.
        head_std: with ``return_heads`` on brme models: each input's head sigmas; None otherwise.
        categories: with ``return_heads`` on dmoerm models: each input's routed task category; None otherwise.
        truncated: per input, whether tokens were dropped to fit the model's max_length.
        input_tokens: tokens scored, after truncation, summed over the call.
        requests: HTTP requests the call took (chunks plus retries).
        brme_seed: with ``brme_sample``: the seed of the draws (pass it again to repeat them).
    """

    model_config = ConfigDict(frozen=True)

    model: str
    reward: str
    rewards: list[float]
    aggregates: dict[str, list[float]] = Field(default_factory=dict)
    heads: list[list[float]] | None = None
    head_std: list[list[float]] | None = None
    categories: list[str] | None = None
    truncated: list[bool]
    input_tokens: int
    requests: int
    brme_seed: int | None = None

    def __len__(self) -> int:
        return len(self.rewards)


class ModelInfo(BaseModel):
    """One served model, as ``GET /v1/models`` describes it (fields this client does not know are kept)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    id: str = Field(description="The model's name, as requests give it.")
    kind: str = Field(description="Model kind: dense, moe, ensemble, multihead, brme, ...")
    heads: list[str] = Field(default_factory=list, description="Head (or member) names, in 'heads' order.")
    reward: str = Field("mean", description="What 'rewards' returns: an aggregate, or combined (dmoerm).")
    aggregates: list[str] = Field(default_factory=list, description="Aggregates a request may ask for.")
    uwo_lambda: float | None = Field(None, description="Default UWO lambda.")
    tradeoff_lambda: float | None = Field(None, description="Default trade-off lambda.")
    max_length: int | None = Field(None, description="Longest input in tokens; longer ones are truncated.")
    default: bool = Field(False, description="Whether requests without 'model' go to this model.")


class _Usage(BaseModel):
    input_tokens: int


class ScoreBody(BaseModel):
    """The body of a 200 answer to ``POST /v1/score``."""

    model: str
    reward: str
    rewards: list[float]
    aggregates: dict[str, list[float]] = Field(default_factory=dict)
    heads: list[list[float]] | None = None
    head_std: list[list[float]] | None = None
    categories: list[str] | None = None
    truncated: list[bool]
    brme_seed: int | None = None
    usage: _Usage


class ModelListBody(BaseModel):
    """The body of a 200 answer to ``GET /v1/models``."""

    data: list[ModelInfo]


class RunListBody(BaseModel):
    """``GET /v1/runs``: the runs the server's monitor keeps (each a dict: id, created, last_seen, models)."""

    window: int
    max_runs: int
    data: list[dict[str, Any]]


class RunBody(BaseModel):
    """``GET /v1/runs/{run}``: one run's series per model (``docs/monitor.md`` has every field)."""

    model_config = ConfigDict(extra="allow")

    id: str
    created: float
    last_seen: float
    models: dict[str, dict[str, Any]]
    normalization: dict[str, dict[str, float]] = Field(default_factory=dict)
