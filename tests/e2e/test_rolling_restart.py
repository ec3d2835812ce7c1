"""Graceful shutdown under load: SIGTERM one of two replicas while clients keep scoring through both.

The replica stops accepting connections, answers every request it had accepted and exits cleanly;
the client library's retries move the rest to the other replica. No call fails, every reward is
right, and the two servers' access logs hold exactly one answered request per call: nothing accepted
was lost, nothing was scored twice.
"""

from __future__ import annotations

import asyncio
import json
import time

from rmserve.launch import CLEAN_EXIT, Server, start_server
from rmserve_client import AsyncRewardClient
from tests.scoring_load import expected_rewards, keep_scoring


def answered(server: Server) -> list[dict]:
    """The access records of answered score requests in a JSON log."""
    records = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    return [r for r in records if r.get("path") == "/v1/score" and "status" in r]


def test_sigterm_under_load_loses_no_accepted_request(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    expected = expected_rewards(model_dir)
    args = ["--model", str(model_dir), "--dtype", "float32", "--log-format", "json", "--max-wait-ms", "2"]
    draining = start_server(args, tmp_path / "a.log")
    staying = start_server(args, tmp_path / "b.log")
    calls = 0

    async def load() -> None:
        nonlocal calls
        stop = asyncio.Event()
        async with AsyncRewardClient([draining.url, staying.url], max_retries=8, backoff=0.05) as client:
            scoring = asyncio.create_task(keep_scoring(client, expected, stop))
            await asyncio.sleep(1.5)
            draining.process.terminate()
            await asyncio.sleep(1.5)
            stop.set()
            calls = await scoring  # any failed call raises here

    try:
        asyncio.run(load())
        started = time.monotonic()
        assert draining.process.wait(60) == CLEAN_EXIT, draining.log_text()
        assert time.monotonic() - started < 60
    finally:
        draining.stop()
        assert staying.stop() == CLEAN_EXIT, staying.log_text()

    by_a, by_b = answered(draining), answered(staying)
    assert all(r["status"] == 200 for r in by_a + by_b), [r for r in by_a + by_b if r["status"] != 200]
    assert by_a and by_b
    assert len(by_a) + len(by_b) == calls  # one answered request per call: none lost, none scored twice
    assert "Application shutdown complete" in draining.log_text()
