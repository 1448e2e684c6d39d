"""JSON that users send is read within bounds: a body nested past LATENTRY_JSON_MAX_DEPTH is
a 400 that says so (not a RecursionError's 500), one past LATENTRY_JSON_MAX_BYTES a 413, and
neither changes anything. One loader (coprocessor.bounded_json) reads every such JSON."""

import io

import pytest
import requests

from coprocessor import bounded_json
from registry.models import ApiKey, Expert, ExpertVersion, Review
from tests.factories import upload
from training.models import Dataset, TrainingJob
from webhooks.models import Webhook

pytestmark = pytest.mark.django_db

DEEP = "[" * 200_000 + "]" * 200_000

JSON_ENDPOINTS = [
    ("post", "/api/v1/generate"),
    ("post", "/api/v1/attach"),
    ("post", "/v1/completions"),
    ("post", "/v1/chat/completions"),
    ("post", "/api/v1/webhooks/"),
    ("post", "/api/v1/jobs/training/"),
    ("post", "/api/v1/jobs/evaluation/"),
    ("post", "/api/v1/experts/"),
    ("patch", "/api/v1/experts/alice/pydoc/"),
    ("post", "/api/v1/experts/alice/pydoc/versions/"),
    ("post", "/api/v1/experts/alice/pydoc/reviews/"),
    ("put", "/api/v1/experts/alice/pydoc/aliases/stable/"),
    ("post", "/api/v1/datasets/"),
    ("post", "/api/v1/api-keys/"),
]


def rows():
    models = (Expert, ExpertVersion, Review, ApiKey, Dataset, TrainingJob, Webhook)
    return {model.__name__: model.objects.count() for model in models}


@pytest.fixture
def pydoc(make_expert):
    return make_expert("pydoc")


@pytest.mark.parametrize("method, path", JSON_ENDPOINTS)
def test_it_refuses_a_deeply_nested_body_with_400_on_every_endpoint(
    method, path, alice_client, pydoc
):
    before = rows()
    response = getattr(alice_client, method)(path, DEEP, content_type="application/json")
    assert response.status_code == 400, response.content[:300]
    assert "nested more than 32 levels deep" in response.content.decode()
    assert rows() == before


def test_it_refuses_a_deep_body_from_anyone(anon_client, settings):
    settings.LATENTRY_ANONYMOUS_GENERATION = True  # else the 401 comes before the body is read
    response = anon_client.post("/api/v1/generate", DEEP, content_type="application/json")
    assert response.status_code == 400
    assert "nested more than 32 levels deep" in response.json()["detail"]


def test_it_takes_the_depth_from_the_settings(alice_client, pydoc, settings):
    settings.LATENTRY_JSON_MAX_DEPTH = 2
    body = '{"name": "hooks", "url": "https://example.com/h", "events": [["x"]]}'
    response = alice_client.post("/api/v1/webhooks/", body, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["detail"] == "JSON body is nested more than 2 levels deep"


def test_it_refuses_a_body_over_the_size_limit_with_413(alice_client, pydoc, settings):
    settings.LATENTRY_JSON_MAX_BYTES = 100
    before = rows()
    body = '{"name": "' + "x" * 200 + '"}'
    response = alice_client.post("/api/v1/experts/", body, content_type="application/json")
    assert response.status_code == 413
    assert response.json()["detail"] == "JSON body is over the limit of 100 bytes"
    assert rows() == before


def test_it_refuses_deep_claimed_metrics_in_an_upload(alice_client, pydoc, expert_file):
    response = upload(alice_client, pydoc, expert_file(), claimed_metrics=DEEP)
    assert response.status_code == 400
    assert response.json()["claimed_metrics"] == ["is nested more than 32 levels deep"]
    assert not pydoc.versions.exists()


def test_it_still_reads_ordinary_claimed_metrics(alice_client, pydoc, expert_file):
    response = upload(alice_client, pydoc, expert_file(), claimed_metrics='{"ppl": [1, {"a": 2}]}')
    assert response.status_code == 201
    assert pydoc.versions.get().claimed_metrics == {"ppl": [1, {"a": 2}]}


@pytest.mark.parametrize(
    "text, depth",
    [
        ("1", 0),
        ('"[[[["', 0),
        ("[]", 1),
        ('{"a": [{"b": "]]]}}"}, []]}', 3),
        ('["\\"[[", [["\\\\"]]]', 3),
        ("[" * 10 + "]" * 10, 10),
    ],
)
def test_it_counts_brackets_outside_strings_only(text, depth):
    assert bounded_json.depth(text) == depth


def test_it_decodes_json_at_the_bound_and_refuses_one_level_more():
    assert bounded_json.loads("[" * 32 + "]" * 32, max_depth=32) is not None
    with pytest.raises(bounded_json.TooDeep, match="nested more than 32 levels deep"):
        bounded_json.loads("[" * 33 + "]" * 33, max_depth=32)
    with pytest.raises(bounded_json.TooLarge, match="over the limit of 3 bytes"):
        bounded_json.loads('"é"', max_bytes=3)  # four bytes in UTF-8


def test_it_refuses_a_deep_line_in_a_jsonl_dataset(alice_client):
    upload = io.BytesIO(b'{"text": "ok"}\n' + DEEP.encode() + b"\n")
    upload.name = "deep.jsonl"
    response = alice_client.post(
        "/api/v1/datasets/", {"name": "deep", "file": upload}, format="multipart"
    )
    assert response.status_code == 400
    assert response.json()["file"] == ["line 2: JSON is nested more than 32 levels deep"]
    assert not Dataset.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_it_refuses_a_deep_body_on_the_router_as_a_serving_process_runs_it(asgi_server, settings):
    settings.LATENTRY_ANONYMOUS_GENERATION = True
    response = requests.post(
        f"{asgi_server}/v1/chat/completions",
        data=DEEP,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    assert "nested more than 32 levels deep" in response.text
