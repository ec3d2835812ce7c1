"""Log formats: JSON lines carry access fields at the top level; text stays readable."""

from __future__ import annotations

import json
import logging

from rmserve.logs import JsonFormatter, TextFormatter

ACCESS = {
    "request_id": "abc",
    "method": "POST",
    "path": "/v1/score",
    "status": 200,
    "model": "demo",
    "duration_ms": 12.5,
}


def record(message: str, access: dict | None = None) -> logging.LogRecord:
    rec = logging.LogRecord("rmserve.access", logging.INFO, __file__, 1, message, (), None)
    if access is not None:
        rec.access = access
    return rec


def test_json_lines_put_access_fields_at_the_top_level():
    line = json.loads(JsonFormatter().format(record("request", ACCESS)))
    assert line | {"ts": ""} == {
        "ts": "", "level": "info", "logger": "rmserve.access", "message": "request", **ACCESS,
    }  # fmt: skip
    plain = json.loads(JsonFormatter().format(record("loaded 'demo'")))
    assert plain["message"] == "loaded 'demo'" and "request_id" not in plain


def test_text_access_lines_read_like_an_access_log():
    text = TextFormatter().format(record("request", ACCESS))
    assert text.endswith("rmserve.access: POST /v1/score 200 12.5ms id=abc model=demo")
