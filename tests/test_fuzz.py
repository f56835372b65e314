"""Fuzzing the HTTP API from its own OpenAPI document (schemathesis), against a real server on loopback.

Every answer must be a declared status with its declared schema, never a server error, and data that
breaks the schema must be refused. The examples per operation are bounded (about 2-3 minutes in all).
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from test_server import AUTH, start_server

pytestmark = pytest.mark.slow

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def api_schema():
    proc, url = start_server(["--models", "SD1.5", "--timeout", "20"])
    try:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_answer_is_declared_and_no_input_breaks_the_server(case):
    case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=120)
