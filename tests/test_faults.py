"""Faults of the real services: storage unreachable during uploads, the database connection
lost and back, the broker restarted with jobs queued. (Workers killed mid-job, and storage
down during a job: tests/test_job_workers.py.)"""

import io
import shutil
import signal
import subprocess

import pytest
from django.db import connection
from django.test import Client

from registry.models import ExpertVersion
from tests.factories import (
    FaultProxy,
    Worker,
    client_for,
    free_port,
    new_queue,
    stored_keys,
    upload,
    wait_for,
    worker_env,
)
from training.models import Dataset, Job, TrainingJob


@pytest.mark.django_db
def test_storage_down_during_uploads_is_503_and_leaves_no_row_and_no_object(
    flaky_s3, alice, make_expert, expert_file
):
    expert = make_expert("pydoc")
    client = client_for(alice)
    flaky_s3.cut()
    version = upload(client, expert, expert_file())
    assert version.status_code == 503 and "storage" in version.json()["detail"]
    dataset = client.post(
        "/api/v1/datasets/", {"name": "notes", "file": io.BytesIO(b"some text")}, format="multipart"
    )
    assert dataset.status_code == 503
    page = Client()
    page.force_login(alice)
    form = page.post("/experts/alice/pydoc/upload/", {"file": io.BytesIO(expert_file(seed=3))})
    assert form.status_code == 503 and "storage is unavailable" in form.text
    assert not ExpertVersion.objects.exists() and not Dataset.objects.exists()
    flaky_s3.restore()
    assert stored_keys() == []  # nothing half-written was left behind
    assert upload(client, expert, expert_file()).status_code == 201  # and it works again


def postgres():
    return connection.vendor == "postgresql"


@pytest.mark.django_db(transaction=True)
def test_the_database_lost_and_back_answers_503_then_serves_again(live_server, make_expert):
    if not postgres():
        pytest.skip("needs PostgreSQL (CI has it): SQLite has no connection to lose")
    import requests

    make_expert("pydoc")
    settings_dict = connection.settings_dict
    proxy = FaultProxy(int(settings_dict.get("PORT") or 5432))
    original = (settings_dict.get("HOST"), settings_dict.get("PORT"))
    settings_dict["HOST"], settings_dict["PORT"] = "127.0.0.1", str(proxy.port)
    url = f"{live_server.url}/api/v1/experts/alice/pydoc/"
    try:
        connection.close()
        assert requests.get(url, timeout=10).status_code == 200
        proxy.cut()
        lost = requests.get(url, timeout=30)
        assert lost.status_code == 503 and "database" in lost.json()["detail"]
        proxy.restore()
        back = wait_for(lambda: requests.get(url, timeout=10).status_code == 200, timeout=30)
        assert back
    finally:
        proxy.close()
        settings_dict["HOST"], settings_dict["PORT"] = original
        connection.close()


@pytest.fixture
def private_redis(tmp_path):
    """A Redis server of the test's own, persisting every write (appendfsync always)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is needed (Debian package redis-server)")
    port = free_port()
    command = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
        "--appendonly", "yes", "--appendfsync", "always", "--save", "",
    ]  # fmt: skip

    def start():
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_for(lambda: _answers(port), timeout=10, what="redis to start")
        return process

    server = {"process": start(), "start": start, "url": f"redis://127.0.0.1:{port}/0"}
    yield server
    server["process"].kill()
    server["process"].wait()


def _answers(port):
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_broker_restarted_with_jobs_queued_loses_none(
    private_redis, alice, base_model, make_expert, settings, tmp_path
):
    from kombu import Connection

    from tests.factories import make_dataset
    from training.tasks import train_expert

    queue = new_queue()
    settings.LATENTRY_JOB_QUEUE = "nobody-reads-this"  # the default broker's copies go nowhere
    words = make_dataset(alice)
    params = dict(window=64, ahead_tokens=4, positions_per_window=4, n_latents=2, steps=10)
    jobs = [TrainingJob.start(alice, make_expert(f"queued-{i}"), [words], params) for i in range(3)]
    with Connection(private_redis["url"]) as broker:  # the broker under test gets the jobs
        for job in jobs:
            train_expert.apply_async((job.pk,), queue=queue, connection=broker)
    private_redis["process"].send_signal(signal.SIGKILL)  # the broker dies with them queued
    private_redis["process"].wait()
    private_redis["process"] = private_redis["start"]()  # and comes back from its disk
    artifacts = settings.STORAGES["artifacts"]["OPTIONS"]["location"]
    env = worker_env(queue, artifacts, CELERY_BROKER_URL=private_redis["url"])
    worker = Worker(queue, env, log_path=tmp_path / "worker.log")
    try:
        wait_for(
            lambda: all(TrainingJob.objects.get(pk=j.pk).finished for j in jobs),
            timeout=120,
            what="every queued job to run",
        )
    finally:
        worker.stop()
    assert [TrainingJob.objects.get(pk=j.pk).status for j in jobs] == [Job.SUCCEEDED] * 3


@pytest.mark.django_db
def test_nul_bytes_anywhere_are_400_not_500(alice, make_expert):
    """PostgreSQL refuses NUL in any query; they must never reach one (schemathesis found a
    dataset upload whose base_model held one)."""
    make_expert("pydoc")
    client = client_for(alice)
    assert client.get("/api/v1/experts/alice/py%00doc/").status_code == 400
    assert client.get("/api/v1/experts/", {"domain": "a\x00b"}).status_code == 400
    upload = client.post(
        "/api/v1/datasets/",
        {"name": "notes", "file": io.BytesIO(b"text"), "base_model": "x\x00y"},
        format="multipart",
    )
    assert upload.status_code == 400 and "base_model" in upload.json()
    created = client.post(
        "/api/v1/experts/", {"name": "n", "domain": "\x00", "base_model": "\x00"}, format="json"
    )
    assert created.status_code == 400
    assert Client().get("/experts/alice/py%00doc/").status_code == 400
