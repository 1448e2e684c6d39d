"""Uploading and downloading expert versions, on local disk and on a real S3 endpoint."""

import hashlib
import io
import pickle
import threading

import pytest
import requests
import torch
from django.db import connection

from registry.models import Expert, ExpertVersion
from tests.factories import client_for, stored_keys, upload

pytestmark = pytest.mark.django_db


def download(client, expert, number):
    response = client.get(
        f"/api/v1/experts/{expert.owner.username}/{expert.name}/versions/{number}/download/"
    )
    if response.status_code == 302:
        # S3: a short-lived presigned URL on the storage endpoint itself.
        fetched = requests.get(response["Location"], timeout=10)
        assert fetched.status_code == 200
        return response, fetched.content
    if response.status_code == 200:
        return response, b"".join(response.streaming_content)
    return response, None


def test_a_valid_file_becomes_a_ready_version(
    artifact_backend, alice_client, make_expert, expert_file
):
    expert = make_expert()
    data = expert_file()
    response = upload(alice_client, expert, data, changelog="first")
    assert response.status_code == 201, response.json()
    body = response.json()
    sha256 = hashlib.sha256(data).hexdigest()
    assert body["number"] == 1
    assert body["status"] == "ready"
    assert body["kind"] == "lora"
    assert body["n_latents"] == 4
    assert body["sha256"] == sha256
    assert body["size"] == len(data)
    assert body["config"] == {"ahead_tokens": 4}
    assert stored_keys() == [f"experts/{sha256}.safetensors"]
    assert response["Location"] == "/api/v1/experts/alice/pydoc/versions/1/"


def test_versions_count_up_and_the_same_bytes_are_stored_once(
    alice_client, make_expert, expert_file
):
    expert = make_expert()
    data = expert_file()
    assert upload(alice_client, expert, data).json()["number"] == 1
    assert upload(alice_client, expert, data).json()["number"] == 2
    assert upload(alice_client, expert, expert_file(seed=1)).json()["number"] == 3
    assert len(stored_keys()) == 2
    listed = alice_client.get("/api/v1/experts/alice/pydoc/versions/").json()
    assert [v["number"] for v in listed["results"]] == [3, 2, 1]
    assert alice_client.get("/api/v1/experts/alice/pydoc/").json()["latest_version"] == 3


def test_download_returns_the_bytes_and_counts(
    artifact_backend, alice_client, bob, make_expert, expert_file
):
    expert = make_expert()
    data = expert_file()
    upload(alice_client, expert, data)
    response, content = download(client_for(bob), expert, 1)
    assert content == data
    if artifact_backend == "s3":
        assert response.status_code == 302
        assert "X-Amz-Expires=60" in response["Location"]
    else:
        assert response.status_code == 200
        assert "pydoc--v1.safetensors" in response["Content-Disposition"]
    expert.refresh_from_db()
    assert expert.download_count == 1
    assert ExpertVersion.objects.get().download_count == 1


def test_downloads_count_once_per_caller_and_version_a_day(
    monkeypatch, alice_client, bob, sam, anon_client, make_expert, expert_file
):
    from datetime import timedelta

    from django.utils import timezone

    expert = make_expert()
    upload(alice_client, expert, expert_file())
    for _ in range(5):  # a loop of requests cannot buy the default sort
        assert download(client_for(bob), expert, 1)[0].status_code in (200, 302)
    download(client_for(sam), expert, 1)
    download(anon_client, expert, 1)
    download(anon_client, expert, 1)  # the same address
    expert.refresh_from_db()
    assert expert.download_count == ExpertVersion.objects.get().download_count == 3
    tomorrow = timezone.now() + timedelta(days=1)
    monkeypatch.setattr(timezone, "now", lambda: tomorrow)
    download(client_for(bob), expert, 1)
    expert.refresh_from_db()
    assert expert.download_count == 4


def test_private_downloads_are_404_for_others(
    artifact_backend, alice, bob, make_expert, expert_file
):
    expert = make_expert("secret", visibility=Expert.PRIVATE)
    upload(client_for(alice), expert, expert_file())
    for client in (client_for(None), client_for(bob)):
        response, content = download(client, expert, 1)
        assert response.status_code == 404
    response, content = download(client_for(alice), expert, 1)
    assert content is not None
    expert.refresh_from_db()
    assert expert.download_count == 1


def test_unknown_versions_are_404(alice_client, make_expert):
    expert = make_expert()
    response, _ = download(alice_client, expert, 3)
    assert response.status_code == 404
    assert alice_client.get("/api/v1/experts/alice/pydoc/versions/3/").status_code == 404
    assert alice_client.get("/api/v1/experts/alice/nope/versions/").status_code == 404


def test_only_the_owner_uploads(bob_client, anon_client, make_expert, expert_file):
    expert = make_expert()
    assert upload(bob_client, expert, expert_file()).status_code == 403
    assert upload(anon_client, expert, expert_file()).status_code == 401
    assert not ExpertVersion.objects.exists()
    assert stored_keys() == []


def torch_save_bytes():
    buffer = io.BytesIO()
    torch.save({"soft_tokens": torch.zeros(4, 32)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda spec, good: pickle.dumps({"soft_tokens": [0.0] * 128}), "pickle"),
        (lambda spec, good: torch_save_bytes(), "torch.save"),
        (lambda spec, good: bytes(range(256)) * 64, "not a safetensors file"),
        (lambda spec, good: good[: len(good) // 2], "truncated"),
        (lambda spec, good: good[:40], "truncated"),
        (
            lambda spec, good: good.replace(b'"hidden_size":"32"', b'"hidden_size":"64"'),
            "hidden_size is 64",
        ),
    ],
    ids=["pickle", "torch-save", "random", "truncated-data", "truncated-header", "wrong-hidden"],
)
def test_bad_files_are_rejected_and_leave_nothing(
    artifact_backend, alice_client, make_expert, expert_file, tiny_spec, make_bad, message
):
    expert = make_expert()
    response = upload(alice_client, expert, make_bad(tiny_spec, expert_file()))
    assert response.status_code == 400
    assert message in response.json()["file"][0]
    assert not ExpertVersion.objects.exists()
    assert stored_keys() == []


def test_a_file_with_nan_values_is_refused_and_leaves_nothing(
    settings, alice_client, make_expert, expert_file, tiny_spec
):
    expert = make_expert()
    soft = torch.randn(4, tiny_spec.hidden_size)
    soft[0, 0] = float("nan")
    response = upload(alice_client, expert, expert_file(tensors={"soft_tokens": soft}))
    assert response.status_code == 400
    assert "tensor 'soft_tokens' has NaN or infinite values" in response.json()["file"][0]
    settings.LATENTRY_MAX_CONFIG_BYTES = 10
    response = upload(alice_client, expert, expert_file())
    assert response.status_code == 400
    assert "over the limit of 10" in response.json()["file"][0]
    assert not ExpertVersion.objects.exists()
    assert stored_keys() == []


def test_wrong_shapes_for_the_base_model_are_named(alice_client, make_expert, expert_file):
    expert = make_expert()
    bad = expert_file(tensors={"soft_tokens": torch.zeros(4, 48)})
    response = upload(alice_client, expert, bad)
    assert response.status_code == 400
    assert "soft_tokens has shape [4, 48], expected [4, 32]" in response.json()["file"][0]


def test_an_oversized_file_is_413(settings, alice_client, make_expert, expert_file):
    expert = make_expert()
    data = expert_file()
    settings.LATENTRY_MAX_ARTIFACT_BYTES = len(data) - 1
    response = upload(alice_client, expert, data)
    assert response.status_code == 413
    assert "over the limit" in response.json()["detail"]
    assert not ExpertVersion.objects.exists()
    assert stored_keys() == []


def test_a_declared_oversized_body_is_refused_before_reading(settings, alice_client, make_expert):
    make_expert()
    settings.LATENTRY_MAX_ARTIFACT_BYTES = 1000
    response = alice_client.generic(
        "POST",
        "/api/v1/experts/alice/pydoc/versions/",
        b"x" * 10,
        content_type="multipart/form-data; boundary=xyz",
        CONTENT_LENGTH=str(10**9),
    )
    assert response.status_code == 413


def test_missing_file_and_unknown_fields_are_400(alice_client, make_expert, expert_file):
    expert = make_expert()
    response = alice_client.post(
        "/api/v1/experts/alice/pydoc/versions/", {"changelog": "x"}, format="multipart"
    )
    assert response.status_code == 400
    assert "file" in response.json()
    response = upload(alice_client, expert, expert_file(), colour="red")
    assert response.status_code == 400
    assert response.json()["colour"] == ["unknown field"]
    response = upload(alice_client, expert, expert_file(), claimed_metrics="{oops")
    assert response.status_code == 400
    assert not ExpertVersion.objects.exists()


def test_an_explicit_version_number_that_is_taken_is_409(alice_client, make_expert, expert_file):
    expert = make_expert()
    assert upload(alice_client, expert, expert_file(), number=5).json()["number"] == 5
    response = upload(alice_client, expert, expert_file(seed=2), number=5)
    assert response.status_code == 409
    assert ExpertVersion.objects.count() == 1
    assert len(stored_keys()) == 1


@pytest.mark.django_db(transaction=True)
def test_two_uploads_racing_for_one_number_one_wins_one_gets_409(
    artifact_backend, alice, make_expert, expert_file
):
    expert = make_expert()
    files = [expert_file(seed=10), expert_file(seed=11)]
    barrier = threading.Barrier(2)
    statuses = []

    def race(data):
        try:
            barrier.wait()
            statuses.append(upload(client_for(alice), expert, data, number=1).status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=race, args=(data,)) for data in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [201, 409]
    version = ExpertVersion.objects.get()
    assert stored_keys() == [version.artifact_key]


def test_deleting_an_expert_removes_its_unshared_files(
    alice_client, make_expert, expert_file, django_capture_on_commit_callbacks
):
    shared, own = expert_file(seed=1), expert_file(seed=2)
    first, second = make_expert("first"), make_expert("second")
    upload(alice_client, first, shared)
    upload(alice_client, first, own)
    upload(alice_client, second, shared)
    with django_capture_on_commit_callbacks(execute=True):
        assert alice_client.delete("/api/v1/experts/alice/first/").status_code == 204
    assert stored_keys() == [f"experts/{hashlib.sha256(shared).hexdigest()}.safetensors"]


def test_stored_bytes_are_limited_per_user(
    settings, alice_client, bob_client, make_expert, bob, expert_file
):
    expert = make_expert()
    first = expert_file(seed=1)
    settings.LATENTRY_MAX_STORED_BYTES = len(first) * 2 + 10
    assert upload(alice_client, expert, first).status_code == 201
    dataset = io.BytesIO(b"x" * len(first))
    dataset.name = "d.txt"
    response = alice_client.post(
        "/api/v1/datasets/", {"name": "d", "file": dataset}, format="multipart"
    )
    assert response.status_code == 201, response.json()
    over = upload(alice_client, expert, expert_file(seed=2))
    assert over.status_code == 400
    message = str(over.json())
    assert f"over the quota of {settings.LATENTRY_MAX_STORED_BYTES}" in message
    assert ExpertVersion.objects.count() == 1 and len(stored_keys()) == 2
    theirs = make_expert("theirs", owner=bob)  # a quota is per user
    assert upload(bob_client, theirs, expert_file(seed=2)).status_code == 201
