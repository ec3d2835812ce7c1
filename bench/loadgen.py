"""A load generator that costs the machine less than the server it loads.

httpx spends about as much CPU per request as rmserve itself, so on a shared machine an httpx load
generator measures itself. ``drive`` writes each request's bytes, prepared up front, on its own keep-alive
HTTP/1.1 connection (asyncio streams, one per client) and reads the answer by its ``content-length``:
tens of microseconds per request.

    from loadgen import drive  # bench/loadgen.py, imported by the bench scripts
    seconds = asyncio.run(drive("http://127.0.0.1:8000", "/v1/score", bodies, concurrency=32))
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit


class LoadError(RuntimeError):
    """The server answered a request with something other than 200, or broke the connection."""


def request_bytes(host: str, route: str, body: dict) -> bytes:
    """One POST of ``body`` as JSON, ready to write to a keep-alive connection."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {route} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response's status and body (the server must send ``content-length``, as uvicorn does)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        elif name.strip().lower() == "transfer-encoding":
            raise LoadError(
                f"the server answered with transfer-encoding {value.strip()}; loadgen reads content-length only."
            )
    if length is None:
        raise LoadError("the server's answer has no content-length; loadgen cannot tell where it ends.")
    return status, await reader.readexactly(length)


async def _client(host: str, port: int, requests: Iterator[bytes], latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for request in requests:
            sent = time.perf_counter()
            writer.write(request)
            status, body = await _answer(reader)
            latencies.append(time.perf_counter() - sent)
            if status != 200:
                raise LoadError(f"the server answered {status}: {body[:500].decode(errors='replace')}")
    finally:
        writer.close()


async def drive(
    url: str, route: str, bodies: Sequence[dict], concurrency: int, latencies: list[float] | None = None
) -> float:
    """Send each body as its own request from ``concurrency`` connections; the seconds until the last
    answer. Each request's latency (seconds) is appended to ``latencies`` when given.

    Raises:
        LoadError: an answer was not 200 (its body says why), or the server closed a connection.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    prepared = [request_bytes(parts.netloc, route, body) for body in bodies]
    requests = iter(prepared)  # shared: each client takes the next request when its last is answered
    sink = [] if latencies is None else latencies
    start = time.perf_counter()
    try:
        await asyncio.gather(*(_client(host, port, requests, sink) for _ in range(concurrency)))
    except asyncio.IncompleteReadError as exc:
        raise LoadError(
            f"the server closed a connection mid-answer ({len(exc.partial)} bytes read)."
        ) from None
    return time.perf_counter() - start
