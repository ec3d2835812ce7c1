"""Request and response bodies of the HTTP API (pydantic models only)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rmserve.models.inputs import INPUT_FORMS_HELP, ScoreInput
from rmserve.monitor import RUN_NAME
from rmserve.names import AGGREGATES, AggregateName, RewardName, TradeoffScope

MAX_SEED = 2**63 - 1


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
    aggregates: list[AggregateName] = Field(
        default_factory=list,
        description=f"Aggregates over the model's heads to return besides 'rewards': {', '.join(AGGREGATES)}.",
    )
    uwo_lambda: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="UWO: mean - uwo_lambda * variance (default: the model's).",
    )
    tradeoff_lambda: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Trade-off: lambda * nominal + (1 - lambda) * min (default: the model's).",
    )
    tradeoff_scope: TradeoffScope = Field(
        "input",
        description="Trade-off's worst case: 'input' takes the min over heads per input; 'request' takes, for "
        "every input, the head whose mean reward over this request's inputs is lowest (BRME's min over "
        "reward functions of the expected reward; send one PPO batch per request).",
    )
    brme_sample: bool = Field(
        False,
        description="brme models: each head's reward is a sample mu + a * sigma, a ~ N(0, 1) (BRME's "
        "reparameterised reward); every aggregate is computed from the samples.",
    )
    brme_seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Seeds brme_sample's draws, in input order (default: a fresh seed, returned as brme_seed).",
    )
    return_heads: bool = Field(
        False, description="Also return every head's reward (and sigma for brme models)."
    )
    run: str | None = Field(
        None,
        pattern=f"^{RUN_NAME.pattern}$",
        description="The training run these rewards belong to (the run monitor; also the x-rmserve-run header).",
    )
    normalize: Literal["run"] | None = Field(
        None,
        description="'run': rewards normalised by the run's running mean and std for this model (Welford, "
        "this request's rewards included); needs a run. Off by default: trainers normalise too.",
    )

    @model_validator(mode="after")
    def _seed_needs_sampling(self) -> ScoreRequest:
        if self.brme_seed is not None and not self.brme_sample:
            raise ValueError(
                'brme_seed seeds brme_sample\'s draws; add "brme_sample": true or drop brme_seed.'
            )
        return self


class Usage(BaseModel):
    input_tokens: int = Field(description="Tokens scored, after truncation.")


class ScoreResponse(BaseModel):
    """Rewards in input order (raw logits, no sigmoid); every list has one entry per input."""

    model: str
    reward: RewardName = Field(
        description="What 'rewards' holds: an aggregate, or combined (a dmoerm model's own reward)."
    )
    rewards: list[float]
    aggregates: dict[AggregateName, list[float]] = Field(
        default_factory=dict, description="The requested aggregates, columnar."
    )
    heads: list[list[float]] | None = Field(
        None, description="With return_heads: each input's head rewards (with brme_sample: the samples)."
    )
    head_std: list[list[float]] | None = Field(
        None, description="With return_heads, brme models only: each input's head sigmas."
    )
    categories: list[str] | None = Field(
        None, description="With return_heads, dmoerm models only: each input's routed task category."
    )
    truncated: list[bool] = Field(description="Per input: whether tokens were dropped to fit max_length.")
    brme_seed: int | None = Field(
        None, description="With brme_sample: the seed of the draws (send it to repeat them)."
    )
    usage: Usage


class ModelCard(BaseModel):
    id: str = Field(description="The model's name, as requests give it.")
    aliases: list[str] = Field(
        default_factory=list,
        description="Other names a request's 'model' may give: the path of the folder the model was loaded "
        "from (verl sends its own local model path).",
    )
    object: Literal["model"] = "model"
    kind: str
    architecture: str
    dtype: str
    device: str
    max_length: int
    parameters: int
    weights_bytes: int = Field(description="Memory of the model's weights and buffers on its device.")
    memory_estimate_bytes: int | None = Field(
        None,
        description="Planned before loading: its weights plus the activation peak of its largest batch "
        "(null when the model was not planned).",
    )
    quantize: Literal["none", "int8", "nf4"] = Field(
        "none",
        description="Weight quantisation through bitsandbytes: none, int8 (8-bit weights) or nf4 (4-bit NormalFloat).",
    )
    pooling: str = Field(
        "hf",
        description="Which token a decoder scores: hf (transformers' rule for the checkpoint: the last token "
        "that is not the pad token) or last (the final token); an ensemble of mixed rules lists each member's.",
    )
    compiled: bool = Field(
        False, description="Whether its decoder forwards run through torch.compile (--compile)."
    )
    default: bool = Field(description="Whether requests without 'model' go to this model.")
    heads: list[str] = Field(description="Head (or ensemble member) names, in the order 'heads' lists them.")
    head_std: bool = Field(description="Whether the model reports a sigma per head (brme).")
    nominal: str = Field(description="The nominal head of the nominal and tradeoff aggregates.")
    reward: RewardName = Field(
        description="What 'rewards' returns: an aggregate, or combined (a dmoerm model's own reward)."
    )
    categories: list[str] = Field(
        default_factory=list, description="dmoerm models: the task categories its router picks from."
    )
    aggregates: list[AggregateName] = Field(description="Aggregates a request may ask for.")
    uwo_lambda: float = Field(description="Default UWO lambda.")
    tradeoff_lambda: float = Field(description="Default trade-off lambda.")


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
