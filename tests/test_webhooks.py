"""Webhooks: registered per user, signed, sent by a Celery task with retries, recorded, and
never sent where the operator has not allowed.

Deliveries go to a receiver the test starts on 127.0.0.1 (allowed here by
LATENTRY_WEBHOOK_ALLOWED_NETWORKS, refused by default); the task runs eagerly, its retries
without waiting (LATENTRY_WEBHOOK_RETRY_BASE_S = 0).
"""

import datetime
import json
import socket
import ssl
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path

import pytest
from django.test import Client

from registry.models import ApiKey
from tests.factories import bearer_client, client_for, free_port, upload
from webhooks import outbound, tasks
from webhooks.models import Delivery, Webhook
from webhooks.signing import signature_header, verify
from webhooks.tasks import deliver

HOOKS = "/api/v1/webhooks/"


class Receiver:
    """An HTTP server in a thread that records every request and answers each with the next of
    ``statuses`` (then 204)."""

    def __init__(self, tls=None):
        self.requests, self.statuses = [], []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"path": self.path, "headers": self.headers, "body": body})
                status = receiver.statuses.pop(0) if receiver.statuses else 204
                self.send_response(status)
                if status in (301, 302, 307, 308):
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"nope!")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def webhook_settings(settings):
    settings.LATENTRY_WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    settings.LATENTRY_WEBHOOK_RETRY_BASE_S = 0
    settings.LATENTRY_WEBHOOK_DEADLINE_S = 5
    return settings


def add_hook(client, url, events=("version.published", "alias.moved"), **fields):
    return client.post(HOOKS, {"url": url, "events": list(events), **fields}, format="json")


def test_an_event_reaches_the_owners_hook_signed(
    alice, alice_client, bob_client, make_expert, expert_file, receiver, eager,
    django_capture_on_commit_callbacks,
):  # fmt: skip
    created = add_hook(alice_client, receiver.url)
    assert created.status_code == 201, created.json()
    secret = created.json()["secret"]
    assert secret.startswith("whsec_")
    assert add_hook(alice_client, receiver.url, events=["job.failed"]).status_code == 201
    assert add_hook(bob_client, receiver.url, events=["version.published"]).status_code == 201
    expert = make_expert("pydoc")

    with django_capture_on_commit_callbacks(execute=True):
        assert upload(alice_client, expert, expert_file()).status_code == 201
    with django_capture_on_commit_callbacks(execute=True):
        expert.move_alias(alice, "stable", 1)

    assert len(receiver.requests) == 2  # alice's hook for both; not her job hook, not bob's
    published, moved = receiver.requests
    for request in receiver.requests:
        assert request["path"] == "/hook"
        assert request["headers"]["Content-Type"] == "application/json"
        assert verify(secret, request["body"], request["headers"]["Latentry-Signature"])
    assert published["headers"]["Latentry-Event"] == "version.published"
    body = json.loads(published["body"])
    assert body["event"] == "version.published"
    assert body["data"]["expert"] == "alice/pydoc" and body["data"]["version"] == 1
    assert body["id"] == int(published["headers"]["Latentry-Delivery"])
    assert json.loads(moved["body"])["data"]["alias"] == "stable"
    hook = Webhook.objects.get(pk=created.json()["id"])
    assert [(d.event, d.status, d.attempts, d.response_status) for d in hook.deliveries.all()] == [
        ("alias.moved", Delivery.SUCCEEDED, 1, 204),
        ("version.published", Delivery.SUCCEEDED, 1, 204),
    ]
    assert all(d.delivered_at is not None for d in hook.deliveries.all())


def test_a_signature_is_refused_when_stale_tampered_or_malformed():
    body = b'{"event":"alias.moved"}'
    header = signature_header("whsec_test", body, timestamp=1_000_000)
    assert verify("whsec_test", body, header, now=1_000_000 + 299)
    assert not verify("whsec_test", body, header, now=1_000_000 + 301)  # replayed later
    assert not verify("whsec_test", body, header, now=1_000_000 - 301)  # from the future
    assert not verify("whsec_test", b'{"event":"alias.moved "}', header, now=1_000_000)
    assert not verify("whsec_other", body, header, now=1_000_000)
    resigned = header.replace("t=1000000", "t=1000100")  # a new time on the old signature
    assert not verify("whsec_test", body, resigned, now=1_000_100)
    for malformed in ("", "v1=abc", "t=1000000", "t=x,v1=abc", "t=1000000,v1=é", None):
        assert not verify("whsec_test", body, malformed, now=1_000_000)
    assert verify("whsec_test", body.decode(), header, now=1_000_000)  # str bodies as well


def make_delivery(user, url, event="alias.moved"):
    hook = Webhook.objects.create(owner=user, url=url, events=[event], secret=Webhook.new_secret())
    return Delivery.objects.create(webhook=hook, event=event, payload={"n": 1})


def run(delivery):
    """What the worker does: the task, with its retries (eagerly), to the end."""
    deliver.apply((delivery.pk,))
    delivery.refresh_from_db()
    return delivery


def test_a_failing_receiver_is_tried_again_until_it_answers(alice, receiver):
    receiver.statuses = [500, 503]
    delivery = run(make_delivery(alice, receiver.url))
    assert (delivery.status, delivery.attempts, delivery.response_status) == (
        Delivery.SUCCEEDED, 3, 204,
    )  # fmt: skip
    assert delivery.error == ""
    assert len(receiver.requests) == 3
    assert len({r["body"] for r in receiver.requests}) == 1  # the same body every time
    assert {r["headers"]["Latentry-Delivery"] for r in receiver.requests} == {str(delivery.pk)}


def test_a_delivery_fails_after_its_last_attempt_and_follows_no_redirect(alice, receiver):
    receiver.statuses = [302] * Delivery.MAX_ATTEMPTS
    delivery = run(make_delivery(alice, receiver.url))
    assert (delivery.status, delivery.attempts, delivery.response_status) == (
        Delivery.FAILED, Delivery.MAX_ATTEMPTS, 302,
    )  # fmt: skip
    assert delivery.error == "HTTP 302: nope!"
    assert [r["path"] for r in receiver.requests] == ["/hook"] * Delivery.MAX_ATTEMPTS
    assert delivery.delivered_at is None


def test_a_receiver_that_is_not_listening_is_retried_then_failed(alice):
    delivery = run(make_delivery(alice, f"http://127.0.0.1:{free_port()}/hook"))
    assert (delivery.status, delivery.attempts) == (Delivery.FAILED, Delivery.MAX_ATTEMPTS)
    assert delivery.response_status is None
    assert "could not connect to 127.0.0.1" in delivery.error


def test_loopback_is_refused_by_default_and_nothing_is_sent(alice, receiver, settings):
    settings.LATENTRY_WEBHOOK_ALLOWED_NETWORKS = []
    # A name is accepted when registered; what it resolves to is checked at each attempt.
    created = add_hook(
        client_for(alice), f"http://localhost:{receiver.port}/hook", events=["alias.moved"]
    )
    assert created.status_code == 201, created.json()
    hook = Webhook.objects.get()
    delivery = run(Delivery.objects.create(webhook=hook, event="alias.moved", payload={}))
    assert (delivery.status, delivery.attempts) == (Delivery.FAILED, 1)  # at once: no retry
    assert delivery.error.startswith("refused: localhost resolves to a loopback address")
    assert "127.0.0.1" not in delivery.error
    assert "LATENTRY_WEBHOOK_ALLOWED_NETWORKS" in delivery.error
    assert receiver.requests == []


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1/hook", "loopback"),
        ("http://10.0.0.1/hook", "private"),
        ("https://192.168.1.20:8443/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:10.0.0.1]/hook", "private"),
        ("http://[fd00::1]/hook", "private"),
        ("http://[fec0::1]/hook", "site-local"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://224.0.0.1/hook", "multicast"),
    ],
)
def test_private_ranges_are_refused_at_registration(alice_client, settings, url, kind):
    settings.LATENTRY_WEBHOOK_ALLOWED_NETWORKS = []
    response = add_hook(alice_client, url)
    assert response.status_code == 400
    [message] = response.json()["url"]
    assert f"is a {kind} address" in message and "LATENTRY_WEBHOOK_ALLOWED_NETWORKS" in message
    assert not Webhook.objects.exists()


def test_addresses_that_carry_a_private_one_are_refused(settings):
    settings.LATENTRY_WEBHOOK_ALLOWED_NETWORKS = ["10.1.0.0/16"]
    kind = outbound.refused_kind
    assert kind(ip_address("93.184.215.14")) is None
    assert kind(ip_address("2606:4700::1111")) is None
    assert kind(ip_address("10.1.2.3")) is None  # allowed by the operator
    assert kind(ip_address("::ffff:10.1.2.3")) is None  # the same address
    assert kind(ip_address("10.2.0.1")) == "private"
    assert kind(ip_address("2002:a00:1::")) == "private"  # 6to4 of 10.0.0.1
    assert kind(ip_address("64:ff9b::a00:1")) == "reserved"  # NAT64 of 10.0.0.1
    assert kind(ip_address("240.0.0.1")) == "reserved"
    assert kind(ip_address("100.64.0.1"))  # carrier-grade NAT: not global


@pytest.fixture
def dns(monkeypatch):
    """Names the test points where it likes: {name: [address, ...]}; others resolve as usual."""
    answers = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def test_each_attempt_resolves_again_and_connects_to_the_address_it_checked(alice, receiver, dns):
    dns["hooks.example.com"] = ["127.0.0.1"]
    url = f"http://hooks.example.com:{receiver.port}/hook?from=latentry"
    delivery = run(make_delivery(alice, url))
    assert delivery.status == Delivery.SUCCEEDED
    [request] = receiver.requests
    assert request["headers"]["Host"] == f"hooks.example.com:{receiver.port}"
    assert request["path"] == "/hook?from=latentry"

    dns["hooks.example.com"] = ["10.0.0.7"]  # the name now points inside the network
    delivery = run(make_delivery(alice, url))
    assert (delivery.status, delivery.attempts) == (Delivery.FAILED, 1)
    assert "hooks.example.com resolves to a private address" in delivery.error
    dns["hooks.example.com"] = ["127.0.0.1", "169.254.169.254"]  # one bad answer is enough
    delivery = run(make_delivery(alice, url))
    assert delivery.status == Delivery.FAILED
    assert "hooks.example.com resolves to a link-local address" in delivery.error
    assert len(receiver.requests) == 1


def test_a_refusal_never_names_the_address_a_name_resolves_to(alice, dns, settings):
    """Else a hook's deliveries would map the names of the service's own network."""
    settings.LATENTRY_WEBHOOK_ALLOWED_NETWORKS = []
    dns["db.internal"] = ["10.20.30.40"]
    dns["cache.internal"] = ["127.0.0.53"]
    private = run(make_delivery(alice, "http://db.internal:5432/"))
    loopback = run(make_delivery(alice, "http://cache.internal/"))
    assert private.error == (
        "refused: db.internal resolves to a private address, which the operator has not "
        "allowed (LATENTRY_WEBHOOK_ALLOWED_NETWORKS)"
    )
    assert loopback.error.startswith("refused: cache.internal resolves to a loopback address")
    assert "10.20.30.40" not in private.error and "127.0.0.53" not in loopback.error


@pytest.fixture
def tls():
    """A server context for hooks.example.com, its certificate signed by a CA made here that
    the test trusts through SSL_CERT_FILE (which OpenSSL's default paths read)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject, key, issuer, issuer_key, extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
            )
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    usage = dict.fromkeys(
        ["content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
         "encipher_only", "decipher_only", "digital_signature"], False,
    )  # fmt: skip
    ca = certificate(
        "Test CA", ca_key, "Test CA", ca_key,
        [(x509.BasicConstraints(ca=True, path_length=None), True),
         (x509.KeyUsage(key_cert_sign=True, crl_sign=True, **usage), True)],
    )  # fmt: skip
    server = certificate(
        "hooks.example.com", key, "Test CA", ca_key,
        [(x509.SubjectAlternativeName([x509.DNSName("hooks.example.com")]), False),
         (x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), False)],
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        ca_file, chain = Path(folder, "ca.pem"), Path(folder, "server.pem")
        ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        chain.write_bytes(
            server.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SSL_CERT_FILE", str(ca_file))
            yield context


def test_https_checks_the_certificate_against_the_urls_name(alice, tls, dns):
    receiver = Receiver(tls=tls)
    dns["hooks.example.com"] = dns["other.example.com"] = ["127.0.0.1"]
    try:
        good = run(make_delivery(alice, f"https://hooks.example.com:{receiver.port}/hook"))
        wrong = run(make_delivery(alice, f"https://other.example.com:{receiver.port}/hook"))
    finally:
        receiver.close()
    assert good.status == Delivery.SUCCEEDED, good.error
    assert len(receiver.requests) == 1  # nothing for the name the certificate is not for
    assert (wrong.status, wrong.attempts) == (Delivery.FAILED, Delivery.MAX_ATTEMPTS)
    assert wrong.error.startswith("TLS with 127.0.0.1 failed: ")
    assert "hostname 'other.example.com' doesn't match 'hooks.example.com'" in wrong.error


def test_others_cannot_see_or_change_a_hook(alice, alice_client, bob_client, receiver):
    hook = add_hook(alice_client, receiver.url).json()
    one = f"{HOOKS}{hook['id']}/"
    assert bob_client.get(HOOKS).json()["results"] == []
    assert bob_client.get(one).status_code == 404
    assert bob_client.patch(one, {"active": False}, format="json").status_code == 404
    assert bob_client.delete(one).status_code == 404
    assert bob_client.get(f"{one}deliveries/").status_code == 404
    assert bob_client.post(f"{one}test/").status_code == 404
    assert Webhook.objects.get().active
    reader = bearer_client(alice, scopes=[ApiKey.READ])
    assert reader.get(one).status_code == 200
    assert add_hook(reader, receiver.url).status_code == 403
    assert reader.delete(one).status_code == 403
    assert Webhook.objects.count() == 1


def test_the_secret_shows_only_on_creation_and_the_owner_may_change_a_hook(alice_client, receiver):
    created = add_hook(alice_client, receiver.url, events=["alias.moved", "job.failed"])
    one = f"{HOOKS}{created.json()['id']}/"
    assert "secret" not in alice_client.get(one).json()
    assert "secret" not in alice_client.get(HOOKS).json()["results"][0]
    changed = alice_client.patch(
        one, {"events": ["job.succeeded", "job.failed", "job.failed"], "active": False}
    )
    assert changed.status_code == 200, changed.json()
    assert changed.json()["events"] == ["job.failed", "job.succeeded"]
    assert changed.json()["active"] is False
    assert alice_client.patch(one, {"url": "http://10.0.0.1/"}).status_code == 400
    assert alice_client.patch(one, {"secret": "mine"}).status_code == 400
    assert alice_client.delete(one).status_code == 204
    assert not Webhook.objects.exists()


def test_a_switched_off_hook_hears_nothing(alice, receiver, django_capture_on_commit_callbacks):
    from registry import events

    hook = Webhook.create_for(alice, receiver.url, ["alias.moved"], active=False)
    with django_capture_on_commit_callbacks(execute=True):
        events.emit(alice.pk, events.ALIAS_MOVED, {"alias": "stable"})
    assert not hook.deliveries.exists()


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"url": "https://hooks.example.com/", "events": ["version.deleted"]}, "events", "valid"),
        ({"url": "https://hooks.example.com/", "events": []}, "events", "at least 1"),
        ({"url": "https://hooks.example.com/"}, "events", "required"),
        ({"url": "ftp://hooks.example.com/", "events": ["job.failed"]}, "url", "http://"),
        ({"url": "not a url", "events": ["job.failed"]}, "url", "valid URL"),
        ({"url": "https://me:pw@hooks.example.com/", "events": ["job.failed"]}, "url", "password"),
        ({"url": "https://hooks.example.com/" + "a" * 500, "events": ["job.failed"]}, "url", "500"),
        ({"url": "https://hooks.example.com/", "events": ["job.failed"], "secret": "x"}, "secret",
         "unknown field"),
    ],
)  # fmt: skip
def test_bad_events_and_urls_are_400_naming_the_problem(alice_client, body, field, words):
    response = alice_client.post(HOOKS, body, format="json")
    assert response.status_code == 400
    assert words in str(response.json()[field]), response.json()
    assert not Webhook.objects.exists()


def test_a_user_may_register_only_so_many_hooks(alice_client, bob_client, settings):
    settings.LATENTRY_MAX_WEBHOOKS = 2
    url = "https://hooks.example.com/latentry"
    assert [add_hook(alice_client, url).status_code for _ in range(2)] == [201, 201]
    refused = add_hook(alice_client, url)
    assert refused.status_code == 400
    assert "LATENTRY_MAX_WEBHOOKS" in refused.json()["detail"][0]
    assert add_hook(bob_client, url).status_code == 201  # a cap per user
    assert Webhook.objects.count() == 3


def test_a_test_ping_is_delivered_and_listed_newest_first(
    alice_client, receiver, eager, django_capture_on_commit_callbacks
):
    hook = add_hook(alice_client, receiver.url).json()
    receiver.statuses = [500]
    for _ in range(2):
        with django_capture_on_commit_callbacks(execute=True):
            queued = alice_client.post(f"{HOOKS}{hook['id']}/test/")
        assert queued.status_code == 202 and queued.json()["event"] == "ping"
    assert [json.loads(r["body"])["event"] for r in receiver.requests] == ["ping"] * 3
    listed = alice_client.get(f"{HOOKS}{hook['id']}/deliveries/?page_size=1")
    assert listed.json()["count"] == 2
    [newest] = listed.json()["results"]
    assert (newest["status"], newest["attempts"]) == ("succeeded", 1)
    older = alice_client.get(listed.json()["next"]).json()["results"][0]
    assert (older["status"], older["attempts"], older["error"]) == ("succeeded", 2, "")


def test_only_the_newest_finished_deliveries_are_kept(alice, settings):
    settings.LATENTRY_WEBHOOK_KEEP_DELIVERIES = 3
    first = make_delivery(alice, "https://hooks.example.com/")
    hook = first.webhook
    Delivery.objects.filter(pk=first.pk).update(status=Delivery.FAILED)
    stuck = Delivery.objects.create(webhook=hook, event="alias.moved")  # still pending
    for _ in range(4):
        Delivery.objects.create(webhook=hook, event="alias.moved", status=Delivery.SUCCEEDED)
    made = Delivery.objects.announce(alice.pk, "alias.moved", {"alias": "stable"})
    kept = list(hook.deliveries.order_by("pk").values_list("pk", flat=True))
    assert len(kept) == 4 and stuck.pk in kept and first.pk not in kept
    assert kept[-1] == made[0].pk


def test_the_owner_manages_hooks_on_a_page_without_javascript(alice, bob, receiver):
    page = Client()
    page.force_login(alice)
    assert 'href="/account/webhooks/"' in page.get("/account/").text
    bad = page.post("/account/webhooks/", {"url": "http://10.0.0.1/", "events": ["job.failed"]})
    assert bad.status_code == 400 and "private address" in bad.text
    added = page.post("/account/webhooks/", {"url": receiver.url, "events": ["job.failed"]})
    assert added.status_code == 200 and added["Cache-Control"] == "no-store"
    hook = Webhook.objects.get()
    assert hook.secret in added.text
    again = page.get("/account/webhooks/")
    assert hook.secret not in again.text and receiver.url in again.text
    Delivery.objects.create(
        webhook=hook, event="job.failed", status=Delivery.FAILED, attempts=5, error="HTTP 500"
    )
    listed = page.get("/account/webhooks/").text
    assert "job.failed" in listed and "failed" in listed and "HTTP 500" in listed
    assert "<td>failed</td>" in listed  # the status cell itself
    other = Client()
    other.force_login(bob)
    assert other.post(f"/account/webhooks/{hook.pk}/delete/").status_code == 404
    assert receiver.url not in other.get("/account/webhooks/").text
    assert page.post(f"/account/webhooks/{hook.pk}/delete/").status_code == 302
    assert not Webhook.objects.exists()


def test_staff_read_hooks_and_deliveries_in_the_admin(admin_client, alice):
    delivery = make_delivery(alice, "https://hooks.example.com/latentry")
    hook = delivery.webhook
    for path in (
        "/admin/webhooks/webhook/",
        f"/admin/webhooks/webhook/{hook.pk}/change/",
        "/admin/webhooks/delivery/",
        f"/admin/webhooks/delivery/{delivery.pk}/change/",
    ):
        page = admin_client.get(path)
        assert page.status_code == 200, path
        assert hook.secret not in page.text
    assert admin_client.get("/admin/webhooks/webhook/add/").status_code == 403


def test_a_user_with_too_many_pending_deliveries_across_hooks_gets_no_more_sent(
    alice, bob, settings
):
    from registry import events

    settings.LATENTRY_WEBHOOK_MAX_PENDING = 3
    hooks = [
        Webhook.create_for(alice, f"http://127.0.0.1:9/hook{n}", [events.ALIAS_MOVED])
        for n in range(2)
    ]
    bobs = Webhook.create_for(bob, "http://127.0.0.1:9/hook", [events.ALIAS_MOVED])
    made = [Delivery.objects.announce(alice.pk, events.ALIAS_MOVED, {"n": n}) for n in range(3)]
    assert [len(m) for m in made] == [2, 1, 0]  # only pending ones are queued
    pending = Delivery.objects.filter(webhook__in=hooks, status=Delivery.PENDING)
    assert pending.count() == 3  # across both hooks: 2 to one, 1 to the other
    refused = Delivery.objects.filter(webhook__in=hooks, status=Delivery.FAILED)
    assert refused.count() == 3
    assert refused.first().error == (
        "not sent: you have 3 deliveries still pending, the most one user may have "
        "(LATENTRY_WEBHOOK_MAX_PENDING)"
    )
    assert len(Delivery.objects.announce(bob.pk, events.ALIAS_MOVED, {})) == 1  # a cap per user
    assert bobs.deliveries.get().status == Delivery.PENDING


def test_deliveries_go_to_a_queue_of_their_own(
    alice, monkeypatch, settings, django_capture_on_commit_callbacks
):
    """Not a job worker's queue: a slow receiver must never hold a worker that trains."""
    sent = []
    monkeypatch.setattr(
        deliver.app, "send_task", lambda name, args, *rest, **options: sent.append(options)
    )
    delivery = make_delivery(alice, "https://hooks.example.com/")
    with django_capture_on_commit_callbacks(execute=True):
        tasks.queue([delivery])
    [options] = sent
    queue = deliver.app.amqp.router.route(options, deliver.name)["queue"].name  # as send_task
    assert queue == settings.LATENTRY_WEBHOOK_QUEUE == "webhooks"
    assert queue not in (settings.LATENTRY_JOB_QUEUE, settings.LATENTRY_MAINTENANCE_QUEUE)


ROOT = Path(__file__).resolve().parent.parent


def test_every_way_to_run_the_service_has_a_webhook_worker_apart_from_job_workers():
    """make run, the Procfile, the compose file and the systemd units."""
    commands = [line for line in (ROOT / "Makefile").read_text().splitlines() if "worker" in line]
    commands += (ROOT / "Procfile").read_text().splitlines()
    commands += (ROOT / "deploy/docker-compose.yml").read_text().splitlines()
    for unit in (ROOT / "deploy/systemd").glob("*.service"):
        commands += unit.read_text().splitlines()
    workers = [c for c in commands if "celery -A config worker" in c]
    readers = [c for c in workers if "webhook" in c.lower()]
    assert len(readers) == 4, readers  # one each, reading the webhooks queue only
    assert all("-Q ${LATENTRY_WEBHOOK_QUEUE" in c or "-Q webhooks " in c for c in readers)
    assert not [c for c in workers if "gpu" in c and "webhook" in c]
    make_run = (ROOT / "Makefile").read_text().split("\nrun:")[1].split("\n\n")[0]
    assert "-Q webhooks" in make_run and "$$webhooks" in make_run  # started and stopped


class DripReceiver:
    """A receiver that reads the request, sends ``head`` at once and then ``drip`` a byte at
    a time (every ``interval_s``): each read sees a byte soon, so only a deadline ends it.
    ``hung_up`` records, per connection, whether the caller left before the last byte."""

    def __init__(self, head, drip, interval_s=0.05, tls=None):
        self.head, self.drip, self.interval_s = head, drip, interval_s
        self.hung_up, self.threads = [], []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        if tls is not None:
            self.server = tls.wrap_socket(self.server, server_side=True)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return  # closed
            thread = threading.Thread(target=self.answer, args=(connection,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def answer(self, connection):
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(4096)
            try:
                connection.sendall(self.head)
                for byte in self.drip:
                    time.sleep(self.interval_s)
                    connection.sendall(bytes([byte]))
            except OSError:
                self.hung_up.append(True)
            else:
                self.hung_up.append(False)

    def close(self):
        self.server.close()
        for thread in self.threads:
            thread.join(timeout=30)


@pytest.mark.parametrize(
    ("head", "drip", "error"),
    [
        # The status line and headers a byte at a time: no answer at all by the deadline.
        (b"", b"HTTP/1.1 200 OK\r\nX-Padding: " + b"." * 40 + b"\r\nContent-Length: 0\r\n\r\n",
         "no complete answer within 0.5 s (LATENTRY_WEBHOOK_DEADLINE_S)"),
        # A failure's body a byte at a time: the status is kept, the body cut off.
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 80\r\n\r\n", b"x" * 80, "HTTP 503"),
    ],
)  # fmt: skip
def test_a_receiver_that_drips_its_answer_is_cut_off_at_the_deadline(
    alice, settings, head, drip, error
):
    settings.LATENTRY_WEBHOOK_DEADLINE_S = 0.5  # the drip takes 2 s at least
    receiver = DripReceiver(head, drip)
    try:
        delivery = make_delivery(alice, receiver.url)
        assert delivery.attempt() is True  # another attempt will follow
    finally:
        receiver.close()
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (Delivery.PENDING, 1)
    assert delivery.error.startswith(error)  # what arrived by then, if anything
    assert receiver.hung_up == [True]  # the attempt left before the answer's end


def test_a_hook_that_keeps_failing_is_switched_off_and_its_owner_switches_it_on(
    alice, alice_client, receiver, settings
):
    settings.LATENTRY_WEBHOOK_MAX_FAILURES = 3
    receiver.statuses = [500, 500, 204, 500, 500, 500]
    hook = make_delivery(alice, receiver.url).webhook
    assert run(hook.deliveries.get()).status == Delivery.SUCCEEDED  # 2 failures, then 2xx
    hook.refresh_from_db()
    assert (hook.active, hook.consecutive_failures) == (True, 0)  # a success forgives

    delivery = run(Delivery.objects.create(webhook=hook, event="alias.moved"))
    assert (delivery.status, delivery.attempts) == (Delivery.FAILED, 4)
    assert delivery.error == "the webhook was switched off"
    assert len(receiver.requests) == 6  # nothing after the third failure in a row
    one = f"{HOOKS}{hook.pk}/"
    shown = alice_client.get(one).json()
    assert (shown["active"], shown["consecutive_failures"]) == (False, 3)
    assert shown["disabled_reason"] == (
        "switched off after 3 failed attempts in a row; the last: HTTP 500: nope!"
    )
    page = Client()
    page.force_login(alice)
    listed = page.get("/account/webhooks/").text
    assert "off: switched off after 3 failed attempts in a row" in listed
    assert f"/account/webhooks/{hook.pk}/switch-on/" in listed

    switched = alice_client.patch(one, {"active": True}, format="json")
    assert switched.status_code == 200, switched.json()
    assert (switched.json()["consecutive_failures"], switched.json()["disabled_reason"]) == (0, "")
    assert run(Delivery.objects.create(webhook=hook, event="alias.moved")).attempts == 1


def test_the_owner_switches_a_hook_back_on_from_its_page(alice, bob, receiver):
    hook = Webhook.create_for(alice, receiver.url, ["alias.moved"])
    Webhook.objects.filter(pk=hook.pk).update(
        active=False, consecutive_failures=25, disabled_reason="switched off after 25 ..."
    )
    other = Client()
    other.force_login(bob)
    assert other.post(f"/account/webhooks/{hook.pk}/switch-on/").status_code == 404
    page = Client()
    page.force_login(alice)
    assert page.get(f"/account/webhooks/{hook.pk}/switch-on/").status_code == 405
    assert page.post(f"/account/webhooks/{hook.pk}/switch-on/").status_code == 302
    hook.refresh_from_db()
    assert (hook.active, hook.consecutive_failures, hook.disabled_reason) == (True, 0, "")
    listed = page.get("/account/webhooks/").text
    assert "switch-on" not in listed and "<td>active</td>" in listed


def test_receivers_deduplicate_on_the_delivery_id_the_signature_covers(alice, receiver):
    receiver.statuses = [500]  # the same delivery twice
    delivery = run(make_delivery(alice, receiver.url))
    secret = delivery.webhook.secret
    ids = set()
    for request in receiver.requests:
        signature = request["headers"]["Latentry-Signature"]
        assert verify(secret, request["body"], signature)
        ids.add(json.loads(request["body"])["id"])
        forged = request["body"].replace(f'"id":{delivery.pk}'.encode(), b'"id":999999')
        assert forged != request["body"] and not verify(secret, forged, signature)
    assert ids == {delivery.pk}
    page = Client()
    page.force_login(alice)
    added = page.post("/account/webhooks/", {"url": receiver.url, "events": ["job.failed"]})
    assert "deduplicate on the <code>id</code> inside the body" in added.text


def test_a_receiver_that_drips_over_https_is_cut_off_at_the_deadline(alice, settings, tls, dns):
    settings.LATENTRY_WEBHOOK_DEADLINE_S = 0.5
    dns["hooks.example.com"] = ["127.0.0.1"]
    receiver = DripReceiver(b"", b"HTTP/1.1 200 OK\r\nX-Padding: " + b"." * 60, tls=tls)
    try:
        delivery = make_delivery(alice, f"https://hooks.example.com:{receiver.port}/hook")
        assert delivery.attempt() is True
    finally:
        receiver.close()
    delivery.refresh_from_db()
    assert delivery.error == "no complete answer within 0.5 s (LATENTRY_WEBHOOK_DEADLINE_S)"
    assert receiver.hung_up == [True]
