"""What the app keeps between requests (on ``app.state.rmserve``)."""

from __future__ import annotations

from dataclasses import dataclass

from rmserve.config import Settings
from rmserve.metrics import Metrics
from rmserve.monitor import RunMonitor
from rmserve.scoring.registry import ModelRegistry


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    monitor: RunMonitor
    registry: ModelRegistry | None = None
    load_error: str | None = None
    shutting_down: bool = False
