"""Datasets: upload plain text or JSONL, validated; stored with sha256, size and token count."""

import hashlib
import io
import json

import pytest
from django.core.management import call_command

from tests.factories import phrase_text, stored_keys
from training.models import Dataset

URL = "/api/v1/datasets/"


def _multipart(data, name, filename, fields):
    upload = io.BytesIO(data)
    upload.name = filename
    return {"name": name, "file": upload, **fields}


def test_text_upload_is_stored_with_hash_size_and_token_count(alice_client, base_model):
    text = phrase_text(length=600).encode()
    response = alice_client.post(
        URL,
        _multipart(text, "words", "words.txt", {"base_model": "tiny-llama"}),
        format="multipart",
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["id"] == "alice/words"
    assert body["sha256"] == hashlib.sha256(text).hexdigest()
    assert body["size"] == len(text)
    assert body["format"] == "text"
    assert body["token_count"] == 600
    assert stored_keys() == [f"datasets/{body['sha256']}.txt"]


def test_jsonl_upload_counts_documents(alice_client, db):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(3)] + [""]
    response = alice_client.post(
        URL, _multipart("\n".join(lines).encode(), "j", "data.jsonl", {}), format="multipart"
    )
    assert response.status_code == 201, response.json()
    assert response.json()["format"] == "jsonl"
    assert response.json()["documents"] == 3


@pytest.mark.parametrize(
    "data, filename, message",
    [
        (b"\xff\xfe not utf8", "x.txt", "not UTF-8 text: invalid byte at offset 0"),
        (b"   \n\n ", "x.txt", "holds no text"),
        (b'{"text": "ok"}\n{"text": 3}\n', "x.jsonl", 'line 2: expected an object with a "text"'),
        (b'{"text": "ok"}\nnot json\n', "x.jsonl", "line 2: not valid JSON"),
        (b"", "x.txt", "empty"),
    ],
)
def test_bad_files_get_400_naming_the_problem_and_store_nothing(
    alice_client, db, data, filename, message
):
    response = alice_client.post(URL, _multipart(data, "bad", filename, {}), format="multipart")
    assert response.status_code == 400
    assert message in " ".join(response.json()["file"])
    assert not Dataset.objects.exists()
    assert stored_keys() == []


def test_over_the_size_limit_is_413(alice_client, db, settings):
    settings.LATENTRY_MAX_DATASET_BYTES = 100
    response = alice_client.post(
        URL, _multipart(b"x" * 101, "big", "b.txt", {}), format="multipart"
    )
    assert response.status_code == 413
    assert not Dataset.objects.exists()


def test_duplicate_name_is_409_and_unknown_fields_400(alice_client, db):
    assert (
        alice_client.post(URL, _multipart(b"one", "d", "a.txt", {}), format="multipart").status_code
        == 201
    )
    again = alice_client.post(URL, _multipart(b"two", "d", "a.txt", {}), format="multipart")
    assert again.status_code == 409
    unknown = alice_client.post(
        URL, _multipart(b"two", "e", "a.txt", {"colour": "red"}), format="multipart"
    )
    assert unknown.status_code == 400 and "colour" in unknown.json()


def test_others_see_public_datasets_only_and_cannot_delete(
    alice_client, bob_client, anon_client, db, django_capture_on_commit_callbacks
):
    alice_client.post(URL, _multipart(b"mine", "private-one", "a.txt", {}), format="multipart")
    alice_client.post(
        URL, _multipart(b"shared", "public-one", "a.txt", {"public": "true"}), format="multipart"
    )
    names = [d["id"] for d in bob_client.get(URL).json()["results"]]
    assert names == ["alice/public-one"]
    assert bob_client.get(f"{URL}alice/private-one/").status_code == 404
    assert bob_client.get(f"{URL}alice/public-one/").json()["id"] == "alice/public-one"
    assert bob_client.delete(f"{URL}alice/public-one/").status_code == 403
    assert anon_client.get(URL).status_code in (401, 403)
    with django_capture_on_commit_callbacks(execute=True):
        assert alice_client.delete(f"{URL}alice/private-one/").status_code == 204
    assert len(stored_keys()) == 1


def test_what_the_api_shows_as_an_id_is_the_address(alice_client, db):
    """A dataset's id is owner/name, and that is where it answers; its row number is not."""
    alice_client.post(URL, _multipart(b"some text", "notes", "a.txt", {}), format="multipart")
    (shown,) = alice_client.get(URL).json()["results"]
    assert alice_client.get(f"{URL}{shown['id']}/").json() == shown
    number = Dataset.objects.get(name="notes").pk
    missing = alice_client.get(f"{URL}{number}/")
    assert missing.status_code == 404 and missing.json() == {"detail": "not found"}


@pytest.mark.parametrize(
    "path", ["/api/v1/no-such-thing/", "/api/v1/datasets/a/b/c/", "/v1/no-such-thing"]
)
def test_a_path_no_api_route_matches_is_a_json_404_even_in_debug(alice_client, settings, path):
    settings.DEBUG = True  # Django's own 404 page would be HTML
    response = alice_client.get(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "not found"}


def test_management_command_creates_a_dataset(alice, base_model, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(phrase_text(length=120))
    out = io.StringIO()
    call_command(
        "create_dataset",
        str(path),
        "--owner",
        "alice",
        "--name",
        "cmd",
        "--base-model",
        "tiny-llama",
        "--public",
        stdout=out,
    )
    dataset = Dataset.objects.get(name="cmd")
    assert dataset.public and dataset.token_count == 120
    assert "alice/cmd" in out.getvalue()


def test_a_large_upload_is_counted_by_a_worker_not_the_request(
    settings, alice_client, base_model, django_capture_on_commit_callbacks, monkeypatch
):
    from training import tasks

    settings.LATENTRY_INLINE_TOKENIZE_BYTES = 100
    queued = []
    monkeypatch.setattr(
        tasks.count_dataset_tokens, "apply_async", lambda args, **options: queued.append(args)
    )
    text = phrase_text(length=600).encode()
    with django_capture_on_commit_callbacks(execute=True):
        response = alice_client.post(
            URL,
            _multipart(text, "big", "big.txt", {"base_model": "tiny-llama"}),
            format="multipart",
        )
    assert response.status_code == 201 and response.json()["token_count"] is None
    (args,) = queued
    tasks.count_dataset_tokens(*args)  # what the worker runs
    assert Dataset.objects.get(name="big").token_count == 600


def test_an_unknown_domain_is_refused_naming_the_domains_there_are(alice_client, domain):
    response = alice_client.post(
        URL, _multipart(b"text", "d", "a.txt", {"domain": "cooking"}), format="multipart"
    )
    assert response.status_code == 400
    assert response.json()["domain"] == ["no domain 'cooking'; there are: python"]
    assert not Dataset.objects.exists()
