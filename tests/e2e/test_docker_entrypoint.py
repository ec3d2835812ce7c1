"""The images' entrypoint and environment, run outside Docker (no engine runs on these machines)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import httpx
import pytest

from rmserve.launch import CLEAN_EXIT, start_server

ROOT = Path(__file__).resolve().parents[2]


def image_config(dockerfile: Path) -> tuple[list[str], dict[str, str]]:
    """The final stage's ENTRYPOINT and ENV of a Dockerfile (line continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    entrypoint: list[str] = []
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENTRYPOINT "):
            entrypoint = json.loads(line.removeprefix("ENTRYPOINT "))
        elif line.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in line.removeprefix("ENV ").split()))
    return entrypoint, env


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_image_entrypoint_serves_with_the_image_environment(name, tiny_model_dirs, tmp_path):
    entrypoint, env = image_config(ROOT / "docker" / name)
    assert entrypoint == ["rmserve", "serve"]
    assert env["RMSERVE_HOST"] == "0.0.0.0" and env["RMSERVE_PORT"] == "8000"
    env = {k: v for k, v in env.items() if k.startswith(("RMSERVE_", "OMP_"))}
    # as `docker run -e RMSERVE_MODEL=/models/... -v cache`; the tests listen on 127.0.0.1 only,
    # so the host flag (which wins over RMSERVE_HOST) keeps the server on loopback
    env |= {"RMSERVE_MODEL": str(tiny_model_dirs["llama"]), "RMSERVE_CACHE_DIR": str(tmp_path / "cache")}
    command = [str(Path(sys.executable).parent / entrypoint[0]), *entrypoint[1:]]
    server = start_server(["--dtype", "float32"], tmp_path / "server.log", env=env, command=command)
    try:
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
        card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
        assert card["id"] == "llama" and card["device"] == "cpu"
        scored = httpx.post(f"{server.url}/v1/score", json={"inputs": [{"text": "hi there"}]})
        assert scored.status_code == 200
    finally:
        assert server.stop() == CLEAN_EXIT, server.log_text()
