"""Schemathesis against the server's own OpenAPI schema: no 5xx and no response that violates it."""

from __future__ import annotations

import pytest

from rmserve.launch import CLEAN_EXIT, start_server

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402


def test_fuzzed_requests_get_no_5xx_and_match_the_schema(tiny_model_dirs, tmp_path):
    server = start_server(
        ["--model", str(tiny_model_dirs["llama"]), "--dtype", "float32"], tmp_path / "server.log"
    )
    try:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        checked = []
        for result in schema.get_all_operations():
            operation = result.ok()

            @hypothesis.settings(
                max_examples=25, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(hypothesis.HealthCheck),
            )  # fmt: skip
            @hypothesis.given(case=operation.as_strategy())
            def fuzz(case) -> None:
                response = case.call(base_url=server.url, timeout=30)
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
                # Validation that depends on the model (vocabulary size, token limits, texts that tokenize to
                # nothing) cannot be in a model-independent schema, so a schema-valid request may get a 422
                # that names the problem: every other check applies.
                case.validate_response(response, excluded_checks=[positive_data_acceptance])

            fuzz()
            checked.append(f"{operation.method.upper()} {operation.path}")
    finally:
        assert server.stop() == CLEAN_EXIT, server.log_text()
    assert {"POST /v1/score", "POST /get_reward", "POST /classify", "GET /v1/models"} <= set(checked)
