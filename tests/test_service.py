"""The service around the API: schema, docs, seed data, home page."""

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from registry.models import Domain

pytestmark = pytest.mark.django_db


def test_the_openapi_schema_and_docs_are_served(client):
    schema = client.get("/api/schema/?format=json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert "/api/v1/experts/{owner}/{name}/versions/" in paths
    assert "/api/v1/experts/{owner}/{name}/versions/{ref}/download/" in paths
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    assert b"swagger" in docs.content.lower()


def test_the_health_check_answers_ok_without_the_database(client, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.get("/api/v1/health/", HTTP_AUTHORIZATION="Bearer lat_revoked_key")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_seed_demo_is_safe_to_run_twice():
    call_command("seed_demo", "--no-base-model")
    call_command("seed_demo", "--no-base-model")
    assert Domain.objects.filter(slug="python", parent__slug="code").exists()
    assert get_user_model().objects.filter(username="demo").count() == 1


def test_the_home_page_points_at_the_api(client):
    response = client.get("/")
    assert response.status_code == 200
    assert b"/api/docs/" in response.content
