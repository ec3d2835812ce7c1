"""Run ``rmserve serve`` as a child process on 127.0.0.1 and wait on /ready (not on log lines).

Used by the end-to-end tests, the benchmarks and the load tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLEAN_EXIT = -signal.SIGTERM


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait, and return the exit code (uvicorn re-raises the signal after a graceful
        shutdown, so a clean stop ends with -SIGTERM)."""
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(
    args: list[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    ready_timeout: float = 300,
    command: list[str] | None = None,
) -> Server:
    """Run ``COMMAND --host 127.0.0.1 --port P ARGS`` and wait until /ready answers 200.

    Args:
        args: flags after the host and port.
        log: file that receives the process's stdout and stderr.
        env: extra environment variables.
        ready_timeout: seconds to wait for /ready.
        command: the server command; default ``python -m rmserve serve``.

    Raises:
        RuntimeError: the process exited, or was not ready in time (the message holds its log).
    """
    port = free_port()
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [
                *(command or [sys.executable, "-m", "rmserve", "serve"]),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *args,
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_text()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not ready after {ready_timeout}s:\n{server.log_text()}")
