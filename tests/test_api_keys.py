"""API keys: bearer authentication, stored only as hashes, scopes, revocation."""

import hashlib

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from registry.models import ApiKey
from tests.factories import bearer_client, logged_in

pytestmark = pytest.mark.django_db


def test_a_created_key_is_shown_once_and_stored_as_a_hash(alice_client, alice):
    response = alice_client.post("/api/v1/api-keys/", {"name": "laptop"})
    assert response.status_code == 201
    plaintext = response.json()["key"]
    assert plaintext.startswith("lat_")
    key = ApiKey.objects.get()
    assert key.secret_sha256 == hashlib.sha256(plaintext.encode()).hexdigest()
    assert plaintext not in str(ApiKey.objects.values())
    listed = alice_client.get("/api/v1/api-keys/").json()["results"]
    assert "key" not in listed[0] or listed[0]["key"] is None
    assert listed[0]["scopes"] == ["read", "write"]


def test_a_bearer_key_authenticates(alice, base_model, domain):
    client = bearer_client(alice)
    response = client.post(
        "/api/v1/experts/", {"name": "via-key", "domain": "python", "base_model": "tiny-llama"}
    )
    assert response.status_code == 201
    assert response.json()["owner"] == "alice"
    assert ApiKey.objects.get().last_used_at is not None


def test_a_read_only_key_cannot_write(alice, base_model, domain):
    client = bearer_client(alice, scopes=[ApiKey.READ])
    assert client.get("/api/v1/experts/").status_code == 200
    response = client.post(
        "/api/v1/experts/", {"name": "x", "domain": "python", "base_model": "tiny-llama"}
    )
    assert response.status_code == 403
    assert "read-only" in response.json()["detail"]


@pytest.mark.parametrize(
    "header",
    ["Bearer lat_nothing_here", "Bearer garbage", "Bearer ", "Bearer lat_abcd1234_wrongsecret"],
)
def test_bad_keys_are_401(header, alice):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get("/api/v1/experts/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_revoked_key_stops_working(alice_client, alice):
    created = alice_client.post("/api/v1/api-keys/", {"name": "old"}).json()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {created['key']}")
    assert client.get("/api/v1/api-keys/").status_code == 200
    assert alice_client.delete(f"/api/v1/api-keys/{created['id']}/").status_code == 204
    assert client.get("/api/v1/api-keys/").status_code == 401


def test_users_see_only_their_own_keys(alice_client, bob_client, alice):
    created = alice_client.post("/api/v1/api-keys/", {"name": "mine"}).json()
    assert bob_client.get("/api/v1/api-keys/").json()["count"] == 0
    assert bob_client.delete(f"/api/v1/api-keys/{created['id']}/").status_code == 404


def test_bad_scopes_are_400(alice_client):
    response = alice_client.post("/api/v1/api-keys/", {"name": "x", "scopes": ["admin"]})
    assert response.status_code == 400
    assert "scopes" in response.json()


def test_the_command_prints_a_working_key(alice, capsys):
    call_command("create_api_key", "alice", "--name", "ci", "--read-only")
    plaintext = capsys.readouterr().out.strip()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    assert client.get("/api/v1/api-keys/").json()["results"][0]["scopes"] == ["read"]


def test_last_use_is_written_at_most_once_a_minute(alice):
    client = bearer_client(alice)
    client.get("/api/v1/experts/")
    first = ApiKey.objects.get().last_used_at
    client.get("/api/v1/experts/")
    assert ApiKey.objects.get().last_used_at == first
    ApiKey.objects.update(last_used_at=first - ApiKey.TOUCH_EVERY)
    client.get("/api/v1/experts/")
    assert ApiKey.objects.get().last_used_at > first


def test_a_user_holds_at_most_the_capped_number_of_keys_through_the_api(
    alice_client, bob_client, settings
):
    settings.LATENTRY_MAX_API_KEYS = 2
    made = [alice_client.post("/api/v1/api-keys/", {"name": f"k{i}"}) for i in range(2)]
    assert [response.status_code for response in made] == [201, 201]
    refused = alice_client.post("/api/v1/api-keys/", {"name": "one-too-many"})
    assert refused.status_code == 400
    assert "2 API keys" in str(refused.json()) and "LATENTRY_MAX_API_KEYS" in str(refused.json())
    assert ApiKey.objects.filter(name="one-too-many").count() == 0
    assert bob_client.post("/api/v1/api-keys/", {"name": "bobs"}).status_code == 201
    alice_client.delete(f"/api/v1/api-keys/{made[0].json()['id']}/")  # revoking frees a place
    assert alice_client.post("/api/v1/api-keys/", {"name": "again"}).status_code == 201


def test_the_account_page_refuses_a_key_past_the_cap_and_says_why(alice, settings):
    settings.LATENTRY_MAX_API_KEYS = 1
    page = logged_in(alice)
    body = {"name": "first", "scopes": ["read"]}
    assert page.post("/account/", body).status_code == 200
    refused = page.post("/account/", {**body, "name": "second"})
    assert refused.status_code == 400
    assert "you have 1 API keys" in refused.content.decode()
    assert list(ApiKey.objects.values_list("name", flat=True)) == ["first"]


def test_the_command_refuses_a_key_past_the_cap(alice, settings):
    settings.LATENTRY_MAX_API_KEYS = 1
    call_command("create_api_key", "alice")
    with pytest.raises(CommandError, match="LATENTRY_MAX_API_KEYS"):
        call_command("create_api_key", "alice")
    assert ApiKey.objects.count() == 1
