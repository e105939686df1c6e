"""Generated requests against the gateway's own OpenAPI schema (schemathesis).

The gateway runs in-process, its lifespan connected to the real RabbitMQ, Redis and
PostgreSQL under private names. For every operation in ``/openapi.json`` schemathesis
generates requests that fit the schema and requests that deliberately do not, sends
them, and runs its checks on every answer: no server error, a documented status code
and content type, a body that matches the schema, invalid input refused, valid input
accepted. The test collects every finding before it fails, and prints how many
requests it sent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import PostgresDsn
from schemathesis import GenerationMode, checks
from schemathesis.core.result import Ok

from recfleet.api.app import create_app
from recfleet.api.auth import Role, entry, new_key
from recfleet.shared.settings import Settings
from tests.support.reports import report
from tests.support.settings import make_settings, purge

EXAMPLES = 100  # per operation and generation mode
# A 503 or 504 passes the server-error check only where the operation documents it
# (no worker answers a synchronous request here: 504).
OUTAGE_STATUSES = (503, 504)
# A request can fit the JSON schema and still be refused on purpose: ids are strict
# integers (JSON Schema counts 1.0 as an integer; the contract refuses floats), and a
# feedback row must name an impression that exists.
ALWAYS_EXCLUDED = (checks.positive_data_acceptance,)
# Keys are on: schemathesis sends this key (every role) where the schema asks for one,
# and checks that requests without it, or with a made-up one, are refused.
KEY = new_key()


@pytest.fixture
def gateway_settings(
    services: None, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    s = make_settings(
        tmp_path_factory.mktemp("no-artifacts"),
        database_url=PostgresDsn(database_url),
        api_keys=entry("schemathesis", KEY, list(Role)),
        page_secret="a-test-secret-of-enough-length",
        # No worker consumes here: a synchronous request waits this long, then gets 504.
        sync_timeout_s=0.2,
    )
    yield s
    purge(s)


def has_inputs(operation: dict) -> bool:
    """Whether an OpenAPI operation takes parameters or a body."""
    return bool(operation.get("parameters") or operation.get("requestBody"))


def test_generated_requests_get_answers_that_conform_to_the_schema(
    gateway_settings: Settings,
) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(gateway_settings))

    @schema.auth()
    class Bearer:
        def get(self, case: schemathesis.Case, ctx: schemathesis.AuthContext) -> str:
            return KEY

        def set(self, case: schemathesis.Case, data: str, ctx: schemathesis.AuthContext) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    findings: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def exercise(case: schemathesis.Case) -> None:
                sent[case.operation.label] += 1
                response = case.call()
                statuses[response.status_code] += 1
                excluded = list(ALWAYS_EXCLUDED)
                documented = set(case.operation.definition.raw.get("responses", {}))
                if response.status_code in OUTAGE_STATUSES and str(response.status_code) in (
                    documented
                ):
                    excluded.append(checks.not_a_server_error)
                case.validate_response(response, excluded_checks=excluded)

            try:
                exercise()
            except Unsatisfiable as exc:
                # Nothing can be invalid about an operation without inputs; anywhere else
                # a strategy that finds no example is a finding.
                if mode is not GenerationMode.NEGATIVE or has_inputs(operation.definition.raw):
                    findings[f"{operation.label} ({mode.value})"] = f"unsatisfiable: {exc}"
            except (Exception, BaseExceptionGroup) as exc:  # collected, reported together
                findings[f"{operation.label} ({mode.value})"] = str(exc).strip()
    report(
        "schemathesis",
        operations=len(operations),
        requests=sum(sent.values()),
        findings=len(findings),
        statuses=",".join(f"{code}x{n}" for code, n in sorted(statuses.items())),
    )
    assert not findings, "\n\n".join(f"{name}:\n{text}" for name, text in findings.items())
    assert not [code for code in statuses if code >= 500 and code not in (503, 504)]
