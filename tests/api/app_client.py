"""The in-process app under test, driven through httpx's ASGI transport."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from rmserve.api.app import create_app
from rmserve.config import ModelSpec, Settings
from rmserve.models.base import RewardModel


@contextlib.asynccontextmanager
async def serve(
    models: Sequence[RewardModel], specs: Sequence[ModelSpec] | None = None, **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on a fresh app serving ``models`` (lifespan run, batchers started and drained)."""
    app = create_app(Settings(**settings), models=models, specs=specs)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rmserve") as client:
            yield client
