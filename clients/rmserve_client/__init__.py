"""rmserve-client: a typed HTTP client of the rmserve reward-model server (httpx and pydantic only).

``RewardClient`` (blocking) and ``AsyncRewardClient`` (asyncio) have the same constructor and the
same methods: ``score``, ``score_messages``, ``score_texts``, ``score_ids``, ``models``, ``health``,
``ready``. Large calls are split into chunks sent concurrently (and spread over several replicas),
transient failures are retried with jittered exponential backoff, and results come back in input
order as a ``ScoreResult``. ``as_reward_func`` and ``as_async_reward_func`` turn a client into a
TRL reward function. The exception hierarchy is drawn in ``rmserve_client._errors``.
"""

from rmserve_client._async_client import AsyncRewardClient
from rmserve_client._client import RewardClient
from rmserve_client._core import __version__
from rmserve_client._errors import (
    ChunkInfo,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RequestTooLarge,
    RewardClientError,
    RewardConnectionError,
    RewardServerError,
    ScoringFailed,
    Unauthorized,
)
from rmserve_client._models import ModelInfo, RunBody, ScoreResult
from rmserve_client._trl import as_async_reward_func, as_reward_func

__all__ = [
    "AsyncRewardClient",
    "ChunkInfo",
    "InvalidRequest",
    "ModelInfo",
    "ModelNotFound",
    "Overloaded",
    "RequestTooLarge",
    "RewardClient",
    "RewardClientError",
    "RewardConnectionError",
    "RewardServerError",
    "RunBody",
    "ScoreResult",
    "ScoringFailed",
    "Unauthorized",
    "__version__",
    "as_async_reward_func",
    "as_reward_func",
]
