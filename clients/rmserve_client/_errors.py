"""The exceptions the client raises, and how an HTTP failure becomes one of them.

Hierarchy::

    RewardClientError                 base of everything below; also an unexpected response body
    ├── RewardConnectionError         no HTTP answer (connect error, timeout, reset) after the retries
    └── RewardServerError             the server answered with an error status
        ├── InvalidRequest            400, 422: an input or option the server refuses
        ├── Unauthorized              401, 403: missing or wrong api_key
        ├── ModelNotFound             404 model_not_found: no such model on the server
        ├── RequestTooLarge           413: too many inputs or tokens in one request
        ├── Overloaded                429, 503: queue full, loading or shutting down, after the retries
        └── ScoringFailed             500: the batch holding the request failed (retried once)

Client-side mistakes (mismatched lengths, a bare string where a list belongs) raise ``ValueError``
or ``TypeError`` before any request is sent.

When a chunked call fails, the exception of the first failing chunk is raised with ``chunk`` set
to which chunk and which input range failed; no partial results are returned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class ChunkInfo:
    """Which part of a chunked call failed: chunk ``index`` (0-based) of ``count``, inputs ``start:stop``."""

    index: int
    count: int
    start: int
    stop: int

    def __str__(self) -> str:
        return f"chunk {self.index + 1} of {self.count} (inputs {self.start}..{self.stop - 1})"


class RewardClientError(Exception):
    """Base class of every error of the rmserve client.

    Attributes:
        message: what went wrong and how to fix it.
        chunk: for a chunked call, which chunk (and input range) failed; None otherwise.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.chunk: ChunkInfo | None = None

    def __str__(self) -> str:
        if self.chunk is None:
            return self.message
        return f"{self.chunk} failed, so the call returns no results: {self.message}"


class RewardConnectionError(RewardClientError):
    """No HTTP answer after the retries: the server is down, unreachable, or too slow for ``timeout``."""


class RewardServerError(RewardClientError):
    """The server answered with an error status.

    Attributes:
        status: the HTTP status code.
        type: the server's error kind (e.g. ``invalid_input``, ``overloaded``), or ``http_<status>``
            when the body was not rmserve's JSON error (e.g. from a proxy).
        server_message: the server's own message.
        request_id: the ``x-request-id`` of the failed request (to find it in the server log).
        attempts: HTTP requests made for this call, retries included.
    """

    hint = ""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        request_id: str | None = None,
        *,
        attempts: int = 1,
        url: str | None = None,
    ) -> None:
        self.status = status
        self.type = type
        self.server_message = message
        self.request_id = request_id
        self.attempts = attempts
        self.url = url
        where = ", ".join(
            part
            for part in (
                url and f"from {url}",
                request_id and f"request id {request_id}",
                attempts > 1 and f"after {attempts} attempts",
            )
            if part
        )
        text = f"{status} {type}: {message}"
        if where:
            text += f" ({where})"
        if self.hint:
            text += f". Hint: {self.hint}"
        super().__init__(text)

    def __reduce__(
        self,
    ) -> tuple[type[RewardServerError], tuple[int, str, str, str | None], dict[str, object]]:
        # rebuilt from the constructor's arguments (plus attempts, url, chunk), so that errors
        # cross process boundaries (multiprocessing, data loader workers) intact
        return type(self), (self.status, self.type, self.server_message, self.request_id), dict(self.__dict__)


class InvalidRequest(RewardServerError):
    """400 or 422: the server refuses an input or an option; its message names which."""

    hint = "fix the input or option the message names; the server's input forms are in the client README."


class Unauthorized(RewardServerError):
    """401 or 403: the server requires an API key and got none, or a wrong one."""

    hint = "pass api_key=<the server's key> to the client (sent as 'Authorization: Bearer <key>')."


class ModelNotFound(RewardServerError):
    """404: the server serves no model of that name."""

    hint = "pass a name that client.models() lists, or model=None for the server's default model."


class RequestTooLarge(RewardServerError):
    """413: one request holds more inputs, bytes or tokens than the server accepts."""

    hint = "lower the client's chunk_size, or shorten the inputs."


class Overloaded(RewardServerError):
    """429 or 503 after the retries: the queue stayed full, or the server is loading or shutting down."""

    hint = (
        "the server stayed busy through every retry; raise max_retries or max_backoff, lower "
        "max_concurrency, add replicas, or wait for client.ready() before scoring."
    )


class ScoringFailed(RewardServerError):
    """500: the forward pass of the batch holding the request failed (also after one retry)."""

    hint = "the server log has the cause (search it for the request id); the request was retried once."


_STATUS_ERRORS: dict[int, type[RewardServerError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: ModelNotFound,
    413: RequestTooLarge,
    422: InvalidRequest,
    429: Overloaded,
    500: ScoringFailed,
    503: Overloaded,
}


def error_from_response(response: httpx.Response, *, attempts: int, url: str) -> RewardServerError:
    """The exception for an error response (its body must already be read).

    A 404 whose type is ``not_found`` means a wrong route, not an unknown model: it is raised as a
    plain ``RewardServerError`` with a hint about ``base_url``.
    """
    kind, message = _error_body(response)
    cls = _STATUS_ERRORS.get(response.status_code, RewardServerError)
    if response.status_code == 404 and kind == "not_found":
        cls = RewardServerError
        message += " Hint: base_url must be the server's root (e.g. http://host:8000), without /v1."
    return cls(response.status_code, kind, message, _request_id(response), attempts=attempts, url=url)


def _request_id(response: httpx.Response) -> str | None:
    """The id the server echoed, else the one the client sent (servers behind proxies may drop it)."""
    echoed: str | None = response.headers.get("x-request-id")
    if echoed:
        return echoed
    try:
        sent: str | None = response.request.headers.get("x-request-id")
    except RuntimeError:  # a response built without its request
        return None
    return sent


def connection_error(exc: httpx.TransportError, *, attempts: int, url: str) -> RewardConnectionError:
    """The exception for a request that got no HTTP answer."""
    if isinstance(exc, httpx.TimeoutException):
        hint = "raise the client's timeout, or lower chunk_size so that each request does less work."
    else:
        hint = "check that the server is running (rmserve serve) and that base_url is right."
    detail = str(exc) or "no detail"
    return RewardConnectionError(
        f"no answer from {url} after {attempts} attempt{'s' if attempts > 1 else ''}: "
        f"{type(exc).__name__}: {detail}. Hint: {hint}"
    )


def _error_body(response: httpx.Response) -> tuple[str, str]:
    """(type, message) of rmserve's ``{"error": {"type", "message"}}``, or of any other body."""
    fallback = f"http_{response.status_code}"
    try:
        body = json.loads(response.content)
    except ValueError:
        text = response.text.strip()
        return fallback, (text[:500] or response.reason_phrase or "no message")
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error.get("type") or fallback), error["message"]
    if isinstance(body, dict) and "detail" in body:
        return fallback, str(body["detail"])[:500]
    return fallback, response.text.strip()[:500] or "no message"
