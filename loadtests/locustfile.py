"""Locust load test of an rmserve server with realistic RLHF traffic: HH-RLHF dialogues from ../shared/data.

Two request shapes, as trainers send them:

- ``SingleRollout`` users post one dialogue per request (OpenRLHF's pattern: many workers, one
  rollout each);
- ``BatchedRollouts`` users post ``RMSERVE_LOAD_BATCH`` dialogues per request (a PPO step scoring its
  rollouts at once; default 16).

Each response's timing headers (``x-queue-time``, ``x-inference-time``, ``x-total-time``) are
recorded as extra locust entries (``queue``, ``inference``, ``server-total``), so the report separates
server-side time from network and client time. Environment: ``RMSERVE_LOAD_MODEL`` (the model to
score with; default: the server's default), ``RMSERVE_LOAD_DATA`` (the HH file), ``RMSERVE_LOAD_BATCH``,
``RMSERVE_API_KEY`` (sent as a Bearer key when set).

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 16 -t 60s
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
from pathlib import Path

from locust import HttpUser, between, events, task

DATA = Path(
    os.environ.get(
        "RMSERVE_LOAD_DATA",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz",
    )
)
MODEL = os.environ.get("RMSERVE_LOAD_MODEL") or None
BATCH = int(os.environ.get("RMSERVE_LOAD_BATCH", "16"))
API_KEY = os.environ.get("RMSERVE_API_KEY", "").split(",")[0].strip()
TURN = re.compile(r"\n\n(Human|Assistant): ")
ROLES = {"Human": "user", "Assistant": "assistant"}
TIMINGS = (("x-queue-time", "queue"), ("x-inference-time", "inference"), ("x-total-time", "server-total"))


def load_dialogues(path: Path) -> list[list[dict[str, str]]]:
    """Every chosen and rejected HH dialogue as chat messages."""
    out = []
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            for dialogue in (row["chosen"], row["rejected"]):
                parts = TURN.split(dialogue)
                messages = [
                    {"role": ROLES[r], "content": c.strip()}
                    for r, c in zip(parts[1::2], parts[2::2], strict=True)
                ]
                if messages:
                    out.append(messages)
    return out


DIALOGUES = load_dialogues(DATA)


class _RewardUser(HttpUser):
    abstract = True
    wait_time = between(0, 0.05)
    inputs_per_request = 1

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    def _score(self, name: str) -> None:
        inputs = [{"messages": random.choice(DIALOGUES)} for _ in range(self.inputs_per_request)]
        body = {"inputs": inputs} | ({"model": MODEL} if MODEL else {})
        with self.client.post("/v1/score", json=body, name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            if len(response.json().get("rewards", [])) != len(inputs):
                response.failure("the response does not have one reward per input")
                return
            for header, entry in TIMINGS:
                if header in response.headers:
                    events.request.fire(
                        request_type="SERVER", name=f"{name} {entry}", response_time=float(response.headers[header]),
                        response_length=0, exception=None, context={},
                    )  # fmt: skip


class SingleRollout(_RewardUser):
    """One dialogue per request."""

    @task
    def score_one(self) -> None:
        self._score("/v1/score [1]")


class BatchedRollouts(_RewardUser):
    """``RMSERVE_LOAD_BATCH`` dialogues per request."""

    inputs_per_request = BATCH

    @task
    def score_batch(self) -> None:
        self._score(f"/v1/score [{BATCH}]")
