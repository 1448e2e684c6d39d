"""Rate limits: generation and uploads answer 429 with Retry-After past their rate, per user,
and a refused upload stores nothing."""

import io

import openai
import pytest

from registry.models import ApiKey, ExpertVersion
from tests.factories import client_for, upload

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def tight(settings):
    settings.LATENTRY_THROTTLE_RATES = {"generate": "2/min", "upload": "1/min"}


def test_generation_past_its_rate_is_429_per_user(tight, alice, bob, base_model):
    body = {"base": base_model.slug, "prompt": "w5 w6", "max_new_tokens": 1}
    alice_client = client_for(alice)
    assert [alice_client.post("/api/v1/generate", body).status_code for _ in range(2)] == [200] * 2
    refused = alice_client.post("/api/v1/generate", body)
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert "throttled" in refused.json()["detail"].lower()
    assert client_for(bob).post("/api/v1/generate", body).status_code == 200


def test_uploads_past_their_rate_are_429_and_store_nothing(tight, alice, make_expert, expert_file):
    expert = make_expert("pydoc")
    client = client_for(alice)
    assert upload(client, expert, expert_file(seed=1)).status_code == 201
    refused = upload(client, expert, expert_file(seed=2))
    assert refused.status_code == 429
    assert ExpertVersion.objects.filter(expert=expert).count() == 1
    assert client.get("/api/v1/experts/alice/pydoc/versions/").status_code == 200  # reads: free
    dataset = {"name": "notes", "file": io.BytesIO(b"some text")}
    assert client.post("/api/v1/datasets/", dataset, format="multipart").status_code == 429


def test_the_openai_client_sees_a_rate_limit_error(tight, asgi_server, base_model, alice):
    _, key = ApiKey.create_for(alice, "openai", [ApiKey.READ])
    client = openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=key, max_retries=0)
    for _ in range(2):
        client.completions.create(model=base_model.slug, prompt="w5", max_tokens=1)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=base_model.slug, prompt="w5", max_tokens=1)


def test_the_pages_share_the_limits(tight, alice, make_expert, publish):
    from django.test import Client

    publish(make_expert("pydoc"))
    client = Client()
    client.force_login(alice)
    tries = [
        client.post("/experts/alice/pydoc/try/", {"prompt": "w5", "max_new_tokens": 1})
        for _ in range(3)
    ]
    assert [r.status_code for r in tries] == [200, 200, 429] and tries[2]["Retry-After"]
    uploads = [
        client.post("/datasets/", {"name": f"d{i}", "file": io.BytesIO(b"x")}) for i in range(2)
    ]
    assert uploads[1].status_code == 429


def test_a_json_body_over_the_memory_limit_is_413_naming_it(settings, alice, make_expert):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    make_expert()
    response = client_for(alice).patch(
        "/api/v1/experts/alice/pydoc/", {"summary": "x" * 2000}, format="json"
    )
    assert response.status_code == 413
    assert response.json()["detail"] == "request body is over the limit of 1000 bytes"


def test_a_burst_of_concurrent_requests_cannot_pass_the_rate_together(alice, settings):
    """DRF's throttle reads the history, appends and writes it back: requests that all read
    before any wrote all passed. The count is one atomic increment instead."""
    import threading
    import time

    from django.core.cache import cache
    from rest_framework.test import APIRequestFactory

    from registry.api import GenerateThrottle

    settings.LATENTRY_THROTTLE_RATES = {"generate": "3/min"}

    class SlowCache:  # widens the window between a read and a write, as load does
        def __getattr__(self, name):
            time.sleep(0.02)
            return getattr(cache, name)

    request = APIRequestFactory().post("/api/v1/generate")
    request.user = alice
    passed = []

    def ask():
        throttle = GenerateThrottle()
        throttle.cache = SlowCache()
        passed.append(throttle.allow_request(request, None))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert passed.count(True) == 3
