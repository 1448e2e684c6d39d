"""Fuzzing every operation of the service's own OpenAPI schema with schemathesis: no response
is a server error, and every response matches the schema (status, content type, body).

Runs in process through the WSGI app, signed in with an API key, against a database holding a
base model, an expert with a version, a review and a dataset, so that generated paths can hit
real objects as well as missing ones. Examples per operation: LATENTRY_FUZZ_EXAMPLES (25).
"""

import os

import pytest
import schemathesis
from django.core import signals
from django.db import close_old_connections
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from config.wsgi import application
from registry.models import ApiKey, Review
from tests.factories import make_dataset

EXAMPLES = int(os.environ.get("LATENTRY_FUZZ_EXAMPLES", "25"))


@pytest.fixture
def in_process_requests():
    """Requests through the WSGI app must not close the test's database connection at their
    end (Django's own test client does the same)."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def data(db, in_process_requests, settings, make_expert, publish, alice, bob):
    settings.LATENTRY_THROTTLE_RATES = {"generate": None, "upload": None}
    expert = make_expert("pydoc")
    publish(expert)
    Review.objects.create(user=bob, expert=expert, stars=4)
    make_dataset(alice)


@pytest.fixture
def bearer(alice):
    _, key = ApiKey.create_for(alice, "fuzz")
    return {"Authorization": f"Bearer {key}"}


def load_schema():
    """The schema /api/schema/ serves, made in process; requests go to the WSGI app."""
    from drf_spectacular.generators import SchemaGenerator

    loaded = schemathesis.openapi.from_dict(SchemaGenerator().get_schema(request=None, public=True))
    loaded.app = application
    return loaded


schema = load_schema()


@schema.parametrize()
@hypothesis_settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_within_its_schema(case, data, bearer):
    case.call_and_validate(
        headers=bearer,
        checks=[
            schemathesis.checks.not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
