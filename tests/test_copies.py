"""A copy is not a second expert: bytes another user's expert already published are refused
on every way in (API upload 409 naming the original, the upload page, import_expert), while
their owner may publish them again. The rule lives in ExpertVersion.publish."""

import hashlib
import io

import pytest
from django.core.management import CommandError, call_command

from registry.models import CopyOfAnother, Expert, ExpertVersion
from tests.factories import logged_in, stored_keys, upload

pytestmark = pytest.mark.django_db


def publish_bytes(expert, data):
    return ExpertVersion.publish(
        expert, io.BytesIO(data), sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )


@pytest.fixture
def original(make_expert, expert_file):
    """alice/pydoc version 1, public: the bytes everyone can download."""
    data = expert_file()
    publish_bytes(make_expert("pydoc"), data)
    return data


def test_it_refuses_another_user_s_upload_of_the_same_bytes_with_409(
    original, make_expert, bob, bob_client
):
    copy = make_expert("pydoc-copy", owner=bob)
    before = stored_keys()
    response = upload(bob_client, copy, original)
    assert response.status_code == 409
    assert "already published as alice/pydoc version 1" in response.json()["detail"]
    assert not copy.versions.exists() and stored_keys() == before


def test_it_lets_the_owner_publish_the_same_bytes_again(original, make_expert, alice_client):
    response = upload(alice_client, make_expert("pydoc-2"), original)
    assert response.status_code == 201


def test_it_does_not_name_an_original_the_uploader_cannot_see(
    make_expert, expert_file, bob, bob_client
):
    data = expert_file(seed=3)
    publish_bytes(make_expert("secret", visibility=Expert.PRIVATE), data)
    response = upload(bob_client, make_expert("mine", owner=bob), data)
    assert response.status_code == 409
    assert "by another user's expert" in response.json()["detail"]
    assert "secret" not in response.json()["detail"]


def test_it_counts_only_ready_versions_as_published(original, make_expert, bob, bob_client):
    ExpertVersion.objects.get().reject("stored bytes do not match")
    response = upload(bob_client, make_expert("pydoc-copy", owner=bob), original)
    assert response.status_code == 201


def test_the_upload_page_refuses_a_copy_next_to_the_file(original, make_expert, bob):
    copy = make_expert("pydoc-copy", owner=bob)
    response = logged_in(bob).post(
        "/experts/bob/pydoc-copy/upload/", {"file": io.BytesIO(original), "changelog": ""}
    )
    assert response.status_code == 400
    assert "already published as alice/pydoc version 1" in response.text
    assert not copy.versions.exists()


def test_import_expert_refuses_another_user_s_copy(original, bob, tmp_path):
    folder = tmp_path / "out"
    call_command("export_expert", "alice/pydoc", str(folder), stdout=io.StringIO())
    before = Expert.objects.count(), stored_keys()
    with pytest.raises(CommandError, match="already published as alice/pydoc version 1"):
        call_command("import_expert", str(folder), "--owner", "bob", stdout=io.StringIO())
    assert (Expert.objects.count(), stored_keys()) == before
    call_command(
        "import_expert", str(folder), "--owner", "alice", "--name", "again", stdout=io.StringIO()
    )
    again = Expert.objects.get(name="again").versions.get()
    assert again.sha256 == hashlib.sha256(original).hexdigest()


def test_the_rule_is_the_model_s_whoever_calls_it(original, make_expert, bob):
    copy = make_expert("pydoc-copy", owner=bob)
    with pytest.raises(CopyOfAnother, match="alice/pydoc version 1"):
        publish_bytes(copy, original)
