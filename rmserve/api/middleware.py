"""ASGI middleware: request ids, the request body limit, request metrics, and API-key authentication.

Plain ASGI (not BaseHTTPMiddleware) so that streaming and cancellation pass through untouched.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from rmserve.logs import ACCESS_LOGGER
from rmserve.metrics import Metrics

access_log = logging.getLogger(ACCESS_LOGGER)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID = "x-request-id"


async def send_json(
    send: Send, status: int, payload: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer with a JSON body (the API's error shape) straight from middleware."""
    body = json.dumps(payload).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": start + (headers or [])})
    await send({"type": "http.response.body", "body": body})


def _form_encoded_json(headers: dict[bytes, bytes], body: bytes) -> bool:
    """A JSON object sent without a JSON content type (``curl -d`` sends form encoding) is read as JSON."""
    content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    return content_type in (b"", b"application/x-www-form-urlencoded") and body.lstrip()[:1] == b"{"


class RequestContextMiddleware:
    """Tags each HTTP request with an id (echoed in ``x-request-id``), enforces ``max_request_bytes``
    (413), reads a JSON object body as JSON even when sent form-encoded (as ``curl -d`` does), and
    counts requests and their latency by model, endpoint and status.

    Routes put the model's name in ``scope["state"]["model"]`` for the metrics label.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_request_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
                await self._too_large(send_with_id, int(length))
                return
            buffered = await self._buffer_body(receive, send_with_id)
            if buffered is None:
                return
            body, body_receive = buffered
            if _form_encoded_json(headers, body):
                scope["headers"] = [
                    (k, b"application/json" if k == b"content-type" else v) for k, v in scope["headers"]
                ] + ([] if b"content-type" in headers else [(b"content-type", b"application/json")])
            await self.app(scope, body_receive, send_with_id)
        finally:
            path = redact_path(scope.get("path", ""))
            model = scope["state"].get("model", "")
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(model, path, str(status)).inc()
            if model:
                self.metrics.request_duration.labels(model, path).observe(elapsed)
            if model and status == 200:
                self.metrics.input_tokens.labels(model).inc(scope["state"].get("input_tokens", 0))
            access = {
                "request_id": request_id, "method": scope.get("method", ""), "path": path, "status": status,
                "model": model, "duration_ms": round(elapsed * 1000, 3),
            }  # fmt: skip
            access_log.info("request", extra={"access": access})

    async def _buffer_body(self, receive: Receive, send: Send) -> tuple[bytes, Receive] | None:
        """Read the whole body (bounded), then replay it; None if it was too large (413 sent) or cut off."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client left before sending the whole body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                await self._too_large(send, size)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return body, replay

    async def _too_large(self, send: Send, size: int) -> None:
        error = {
            "type": "payload_too_large",
            "message": f"the request body has {size}+ bytes, over the limit of {self.max_request_bytes}; "
            "split the inputs over several requests (or raise --max-request-bytes).",
        }
        await send_json(send, 413, {"error": error})


OPEN_PATHS = frozenset({"/health", "/ready"})
KEY_PREFIX = "/key/"
TRAINER_PATHS = frozenset(
    {"/get_reward", "/classify", "/v1/classify", "/pooling", "/v1/pooling", "/v1/embeddings"}
)  # the routes a key in the path opens: those of trainers that send no headers (OpenRLHF)
UNAUTHORIZED = {
    "error": {
        "type": "unauthorized",
        "message": "missing or invalid API key; send the header 'Authorization: Bearer <key>' with a key this "
        "server accepts (RMSERVE_API_KEY), or, from a trainer that sends no headers, put the key in the "
        "path: /key/<key>/get_reward.",
    }
}


def redact_path(path: str) -> str:
    """The path as logs and metrics show it: a key in the path (``/key/<key>/...``) becomes ``***``."""
    if not path.startswith(KEY_PREFIX):
        return path
    _, _, rest = path[len(KEY_PREFIX) :].partition("/")
    return f"{KEY_PREFIX}***/{rest}"


class ApiKeyMiddleware:
    """Every HTTP route but ``/health`` and ``/ready`` needs ``Authorization: Bearer <key>`` with one of ``keys``.

    A trainer that sends no headers (OpenRLHF) puts the key in the path instead: ``/key/<key>`` before
    one of ``TRAINER_PATHS`` (``/key/<key>/get_reward``); the key is checked like a header's, then the path
    is the route's own. Presented keys are compared with every accepted key in constant time
    (``hmac.compare_digest``, no early exit), and every failure gets the same 401, so an answer never
    tells which part was wrong. Keys are never logged (``redact_path``). With no ``keys`` (authentication
    off) every route is open, and a key in the path is refused (404) with the route to call instead.
    """

    def __init__(self, app: ASGIApp, *, keys: tuple[bytes, ...]) -> None:
        self.app = app
        self.keys = keys

    def _matches(self, token: bytes) -> bool:
        matched = False
        for key in self.keys:  # no early exit: the time does not depend on which key matches
            matched |= hmac.compare_digest(token, key)
        return matched

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return self._matches(token.strip()) and scheme.lower() == b"bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(KEY_PREFIX):
            await self._key_in_path(scope, receive, send, path)
            return
        if scope["type"] != "http" or not self.keys or path in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await send_json(send, 401, UNAUTHORIZED, [(b"www-authenticate", b"Bearer")])

    async def _key_in_path(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        key, _, rest = path[len(KEY_PREFIX) :].partition("/")
        route = "/" + rest
        if not self.keys or route not in TRAINER_PATHS:
            why = (
                "this server has no API key set: call the route without /key/<key>"
                if not self.keys
                else f"a key in the path opens only the trainers' routes ({', '.join(sorted(TRAINER_PATHS))}); "
                "send 'Authorization: Bearer <key>' for the others"
            )
            error = {"type": "not_found", "message": f"no route {redact_path(path)}: {why}."}
            await send_json(send, 404, {"error": error})
            return
        if not self._matches(key.encode("utf-8", "replace")):
            await send_json(send, 401, UNAUTHORIZED, [(b"www-authenticate", b"Bearer")])
            return
        scope["path"] = route
        scope["raw_path"] = route.encode("latin-1")
        await self.app(scope, receive, send)
