"""Fuzzing the HTTP API from its own OpenAPI document (schemathesis), against a real server on loopback.

Every answer must be a declared status with its declared schema, never a server error, and data that
breaks the schema must be refused. Cases come from schemathesis' strategies for each operation, valid
(positive) and schema-breaking (negative), a bounded number of each (about 2-3 minutes in all).
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from test_server import AUTH, start_server

pytestmark = pytest.mark.slow

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, negative_data_rejection]
EXAMPLES = {"/v1/image/generation": 600}
DEFAULT_EXAMPLES = 25
SMALL = {"width": 64, "height": 64, "steps": 2, "batch_size": 1, "n_iter": 1}
CHEAP = {"/v1/images/generations": {"size": "64x64", "n": 1}, "/sdapi/v1/txt2img": SMALL, "/sdapi/v1/img2img": SMALL}
"""Valid cases of the routes whose model is optional (OpenAI's and A1111's) really generate: their size and
steps are kept small, since a random valid size runs past the fuzz server's time limit (a 504)."""


@pytest.fixture(scope="module")
def api_schema():
    proc, url = start_server(["--models", "SD1.5", "--timeout", "20"])
    try:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_every_answer_is_declared_and_no_input_breaks_the_server(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/image/generation", "/v1/models", "/metrics", "/readyz"}
    calls: list[int] = []
    for operation in operations:
        takes_data = bool(operation.body)  # the GETs and POST /sdapi/v1/interrupt take nothing to break
        for mode in list(schemathesis.GenerationMode) if takes_data else [schemathesis.GenerationMode.POSITIVE]:
            cheap = CHEAP.get(operation.path, {}) if mode == schemathesis.GenerationMode.POSITIVE else {}

            @given(case=operation.as_strategy(generation_mode=mode), cheap=st.just(cheap))
            @settings(max_examples=EXAMPLES.get(operation.path, DEFAULT_EXAMPLES), deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), derandomize=True)
            def fuzz(case, cheap):
                if isinstance(case.body, dict):
                    case.body.update(cheap)
                calls.append(case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=120).status_code)

            fuzz()
    assert len(calls) > 200 and any(400 <= code < 500 for code in calls), sorted(set(calls))
