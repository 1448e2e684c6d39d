"""Shared fixtures: personas, a tiny real base model, expert files, and both storage backends.

Personas, built once here and named in every test that needs one: alice owns experts; bob is
signed up and has no access at all to what alice has not made public (he stands for every other
user); sam is staff. Plain helpers that tests and benches share are in factories.py.
"""

import hashlib
import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from django.core.cache import caches
from rest_framework.test import APIClient

from coprocessor import base_models, routing
from coprocessor.base_models import convert, describe
from registry.models import Domain, Expert, ExpertVersion
from tests.factories import (
    client_for,
    expert_bytes,
    expert_file_bytes,
    free_port,
    frozen,
    register_tiny_llama,
    tiny_llama,
    word_tokenizer,
)


@pytest.fixture(scope="session")
def tiny_spec():
    """The spec (shapes, fingerprint) of a tiny randomly initialised llama model."""
    return describe(frozen(tiny_llama))


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """The tiny llama and a word-level tokenizer saved as a base-model folder workers load."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = word_tokenizer()
    convert(frozen(tiny_llama), tokenizer, folder)
    return folder


@pytest.fixture
def base_model(db, tiny_spec, tiny_base_dir):
    return register_tiny_llama(tiny_spec, tiny_base_dir)


@pytest.fixture
def domain(db):
    return Domain.objects.create(slug="python", name="Python")


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="alice-pass-1")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="bob-pass-1")


@pytest.fixture
def sam(django_user_model):
    return django_user_model.objects.create_user("sam", password="sam-pass-1", is_staff=True)


@pytest.fixture
def anon_client():
    return APIClient()


@pytest.fixture
def alice_client(alice):
    return client_for(alice)


@pytest.fixture
def bob_client(bob):
    return client_for(bob)


@pytest.fixture
def make_expert(base_model, domain, alice):
    def make(name="pydoc", owner=None, visibility=Expert.PUBLIC, **fields):
        return Expert.objects.create(
            owner=owner or alice,
            name=name,
            title=fields.pop("title", name.title()),
            domain=fields.pop("domain", domain),
            base_model=fields.pop("base_model", base_model),
            visibility=visibility,
            **fields,
        )

    return make


# --- working experts on the tiny base model (router, jobs) ------------------------------------


@pytest.fixture
def decoder(tiny_base_dir):
    model, tokenizer = base_models.load(tiny_base_dir)
    return model, tokenizer


@pytest.fixture
def publish(decoder, base_model, tmp_path):
    """Publish a working expert (and, from ``profile_text``, its routing profile)."""

    def publish(expert, seed=0, profile_text=None, **config):
        data = expert_bytes(decoder[0], base_model.fingerprint, seed, tmp_path, **config)
        profile = []
        if profile_text is not None:
            ids = torch.tensor(decoder[1](profile_text)["input_ids"])
            profile = routing.profile(decoder[0], ids, window=64)
        return ExpertVersion.publish(
            expert,
            io.BytesIO(data),
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            routing_profile=profile,
        )

    return publish


@pytest.fixture
def expert_file(tiny_spec):
    def make(**kwargs):
        return expert_file_bytes(tiny_spec, **kwargs)

    return make


# --- storage backends ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint: moto's server in its own process, for the whole session."""
    port = free_port()
    moto_server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    process = subprocess.Popen(
        [moto_server, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        process.kill()
        raise RuntimeError("moto server did not start")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


def s3_storage_settings(endpoint, bucket):
    return {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": bucket,
            "endpoint_url": endpoint,
            "region_name": "us-east-1",
            "querystring_expire": 60,
            "file_overwrite": True,
            "default_acl": None,
            "signature_version": "s3v4",
        },
    }


@pytest.fixture
def flaky_s3(s3_endpoint, settings):
    """The artifact store behind a proxy the test can cut off, for the test and its workers."""
    import boto3

    from tests.factories import FaultProxy, new_queue

    port = int(s3_endpoint.rsplit(":", 1)[1])
    proxy = FaultProxy(port)
    bucket = f"flaky-{new_queue()}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    endpoint = f"http://127.0.0.1:{proxy.port}"
    settings.STORAGES = {**settings.STORAGES, "artifacts": s3_storage_settings(endpoint, bucket)}
    proxy.env = {"S3_BUCKET": bucket, "S3_ENDPOINT_URL": endpoint, "S3_REGION": "us-east-1"}
    yield proxy
    proxy.close()


@pytest.fixture(params=["filesystem", "s3"])
def artifact_backend(request, settings, tmp_path):
    """Run a test once against local disk and once against the S3 endpoint."""
    if request.param == "filesystem":
        settings.STORAGES = {
            **settings.STORAGES,
            "artifacts": {
                "BACKEND": "registry.storage.AtomicFileSystemStorage",
                "OPTIONS": {"location": tmp_path / "artifacts"},
            },
        }
    else:
        import boto3

        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = f"test-{request.node.name.lower().replace('[', '-').replace(']', '')}"[:60]
        bucket = "".join(c if c.isalnum() or c == "-" else "-" for c in bucket).strip("-")
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)
        settings.STORAGES = {
            **settings.STORAGES,
            "artifacts": s3_storage_settings(endpoint, bucket),
        }
    return request.param


@pytest.fixture(autouse=True)
def empty_cache():
    """No test sees a page or a rate-limit count that an earlier test cached."""
    for each in caches.all():
        each.clear()


@pytest.fixture(autouse=True)
def isolated_artifacts(settings, tmp_path):
    """Never write to the developer's var/artifacts from a test."""
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {
            "BACKEND": "registry.storage.AtomicFileSystemStorage",
            "OPTIONS": {"location": tmp_path / "artifacts"},
        },
    }


class _DeprecationIsAnError(logging.Handler):
    """transformers announces some deprecations through its logger, not the warnings module
    (``past_key_values`` -> ``cache``): in the tests those fail the call that caused them."""

    def filter(self, record):
        if "deprecat" in record.getMessage().lower():
            raise AssertionError(f"transformers deprecation: {record.getMessage()}")
        return False

    def emit(self, record):
        pass


logging.getLogger("transformers").addHandler(_DeprecationIsAnError())


def run_order(item):
    """The README's walk, then the benches' smoke runs, then the other slow tests, then the rest:
    xdist hands tests out in this order, so the long ones start early on both workers instead
    of one worker ending the run alone in a long test."""
    if item.nodeid.startswith("tests/test_readme.py"):
        return 0
    if item.get_closest_marker("bench"):
        return 1
    return 2 if item.get_closest_marker("slow") else 3


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    items.sort(key=run_order)  # stable: each file's tests keep their order


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from threads, and a second thread fights the other core."""
    torch.set_num_threads(1)


@pytest.fixture
def asgi_server(transactional_db):
    """The project's ASGI application under uvicorn in a thread, as a serving process runs it
    (async router views, streams that hold no thread); yields its base URL."""
    import threading

    import uvicorn

    from config.asgi import application

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            application, host="127.0.0.1", port=port, lifespan="off", log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    application.app.close_connections()  # SharedSyncThreads, inside BoundedBody


@pytest.fixture
def eager():
    """Celery tasks run in this process, as they are sent (jobs, measurements, deliveries)."""
    from config.celery import app

    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = False


@pytest.fixture
def fresh_pool():
    """No base model, expert or routing profile cached from another test, before or after."""
    from inference import choose, pool

    pool.reset()
    choose.profiles.clear()
    yield
    pool.reset()
