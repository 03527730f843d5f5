"""Property-based requests generated from the gateway's own OpenAPI document find no 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok

from tests.gateway_process import GatewayProcess, comfy_workflow, gateway

STATUSES: list[int] = []  # every status seen, to prove the run reached real handlers
PARAMS = [
    {"key": "width", "type": "number", "min": 8, "max": 512, "node_id": "3", "field": "width"}
]


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    """A dedicated gateway with a team, a credential and one workflow."""
    with gateway(Path(tmp_path_factory.mktemp("fuzz"))) as proc:
        dk = proc.credential("fuzz")
        proc.create_workflow(dk, comfy_workflow(PARAMS, workflow_slug="fuzz"))
        yield proc, dk


def test_no_server_errors(fuzz_gateway: tuple[GatewayProcess, str]) -> None:
    """No generated request to any operation, valid or not, makes the gateway answer 5xx."""
    proc, dk = fuzz_gateway
    schema = schemathesis.openapi.from_url(f"{proc.url}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the document itself is valid
        operations.append(result.ok())
    assert len(operations) >= 12  # every documented route is in the schema
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case[Any]) -> None:
            response = case.call(
                base_url=proc.url, headers={"Authorization": f"Bearer {dk}"}, timeout=30
            )
            STATUSES.append(response.status_code)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path}: {response.status_code} "
                    f"{response.text[:300]}"
                )

        check()
    assert failures == []
    assert any(200 <= s < 300 for s in STATUSES)  # authenticated requests reached the handlers
