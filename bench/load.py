"""Load on the whole service: gunicorn + PostgreSQL + Redis + a job worker, a mix of catalog
reads, uploads and generation at rising concurrency.

How:

1. A fresh PostgreSQL database (``latentry_load``), migrated with production settings
   (``DEBUG=false``); Redis as the Celery broker and the shared cache (rate limits off, so the
   service rather than the limits is measured); artifacts on local disk; the tiny test llama as
   the base model, so that generation measures the service, not a 135M model on two cores.
   It seeds 500 public experts to browse and one expert per client to upload versions to.
2. gunicorn serves ``config.wsgi`` (as bench/api_load.py does) and one Celery worker runs a
   small training job that is queued when the load starts, as a GPU worker would.
3. Steps of ``--steps`` concurrent clients (default 1, 2, 4, ..., 128), ``--seconds`` each.
   Every client has its own API key and keep-alive connection and sends, at random: 70%
   catalog reads (list by downloads, search, one expert), 20% generation
   (``POST /api/v1/generate``, 8 greedy tokens, half of them with one of five published
   experts), 10% uploads of a
   new version of its own expert (a valid 40 KB expert file).
   A step is *sustained* when it has no errors (non-2xx answers, exceptions) and its p95
   latency is under ``--p95-ms``; the run stops at the first step that is not.
4. Lost writes: every upload (each a distinct file) answered 201 must be its own version row
   whose stored file reads back with its sha256, with no row no answer accounts for; the
   training job must not have failed.

    .venv/bin/python bench/load.py [--seconds 15] [--p95-ms 1000] [--steps 1,2,4,8,16,32,64,128]

Ends with ``RESULT sustained_rps=<x> errors=<n> lost_writes=<n>``: the requests/s of the highest
sustained step, the errors at that step, and the writes lost over the whole run. Target: zero
errors and zero lost writes at the highest sustained step.

``--abuse`` measures instead what abusive accounts do to everyone else. The same service (no
job worker; a webhook worker on the deliveries' own queue), with the limits abusers meet switched
on: uploads 60/hour, job starts 30/hour and 3 active, a storage quota of 8 MiB.
``--legit-clients`` (4) legitimate clients send the mix at Poisson arrivals of ``--legit-rate``
(5) requests/s each, for ``--seconds`` alone and then beside ``--abusers`` (3) accounts with
``--abuser-threads`` (2) clients each, from a process of their own, at ``--abuser-rate`` (5)
requests/s each (60% of the traffic): hostile uploads (NaN values, 5,000 tensors, a config
nested 100,000 deep, a pickle), valid 1 MB uploads to hoard storage, 3 MB JSON bodies, JSON
bodies nested 200,000 deep, loops of downloads, of job starts through the API and through the
training page (a signed-in session), and bursts of 8 generations at once, each with another of
the API keys the account holds (as many as it may). Each account's webhook points at a receiver
that answers a byte every half second.
Ends with ``RESULT legit_errors=<n> legit_p95_ratio=<with/without> abuser_bytes_stored=<n>
abuser_jobs_over_cap=<n> lost_writes=<n>`` (the most any abuser holds; jobs started and not
finished beyond the active-job cap). Targets: 0 legitimate errors, p95 ratio <= 1.5, no abuser
past the quota, 0 jobs over the cap, 0 lost writes.

    .venv/bin/python bench/load.py --abuse [--seconds 15]
"""

import argparse
import contextlib
import dataclasses
import http.client
import io
import json
import random
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

from common import (
    Stats,
    add_smoke_argument,
    add_web_workers_argument,
    free_port,
    migrated_database,
    parse,
    server_env,
    start_gunicorn,
    start_uvicorn,
    stop,
    wait_until_ready,
)
from urllib3 import encode_multipart_formdata

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/latentry_load"
# Redis databases (broker, cache) per kind of run: the sustained-load and the abuse runs have
# their own (and their own PostgreSQL database), so both may run at once, as the tests' workers
# run their smoke runs. bench/api_load.py uses 7.
REDIS_DATABASES = {"load": (5, 6), "abuse": (8, 9)}


def redis_urls(args):
    broker, cache = REDIS_DATABASES["abuse" if args.abuse else "load"]
    return f"redis://127.0.0.1:6379/{broker}", f"redis://127.0.0.1:6379/{cache}"


def database_url(args):
    return f"{args.database_url}_abuse" if args.abuse else args.database_url


MIX = [("read", 0.7), ("generate", 0.2), ("upload", 0.1)]
GENERATED_EXPERTS = range(5)  # the published experts that generation asks for
SMOKE = dict(
    seconds=0.5,
    steps="1",
    legit_clients=2,
    abusers=1,
    abuser_threads=1,
    web_workers=1,
    database_url=DEFAULT_DATABASE_URL + "_smoke",
)


def environment(args, var_dir):
    broker_url, cache_url = redis_urls(args)
    env = server_env(database_url(args), cache_url, var_dir)
    env.update(
        CELERY_BROKER_URL=broker_url,
        LATENTRY_ARTIFACTS_DIR=str(var_dir / "artifacts"),
        LATENTRY_GENERATE_RATE="",
        LATENTRY_UPLOAD_RATE="",
        LATENTRY_CATALOG_CACHE_SECONDS="0",
        LATENTRY_JOB_QUEUE="load",
        LATENTRY_PROGRESS_SECONDS="1",
        LATENTRY_DEVICE="cpu",
        OMP_NUM_THREADS="1",
    )
    return env


def fresh_service(args, var_dir, make_environment):
    """An empty, migrated database and Redis for a run in ``var_dir``; returns its environment."""
    (var_dir / "staticfiles").mkdir()
    env = make_environment(args, var_dir)
    flush_redis(args)
    migrated_database(database_url(args), env)
    return env


def flush_redis(args):
    import redis

    for url in redis_urls(args):
        redis.Redis.from_url(url).flushdb()


def seed(clients, var_dir):
    """Base model, 500 public experts (the first five with a version, for generation), and
    per client a user, a key and an expert; returns [(key, expert path)] per client, a maker
    of the distinct files uploads send, and the base model's slug. Django is set up by
    ``migrated_database`` (fresh_service)."""
    from django.contrib.auth import get_user_model

    from coprocessor.base_models import convert, describe
    from registry.models import ApiKey, Domain, Expert, ExpertVersion
    from registry.storage import sha256_of
    from tests.factories import (
        expert_file_bytes,
        frozen,
        register_tiny_llama,
        tiny_llama,
        word_tokenizer,
    )

    model = frozen(tiny_llama)
    folder = var_dir / "tiny-llama"
    convert(model, word_tokenizer(), folder)
    base = register_tiny_llama(describe(model), folder)
    domain = Domain.objects.create(slug="load", name="Load")
    publisher = get_user_model().objects.create_user("publisher")
    Expert.objects.bulk_create(
        Expert(
            owner=publisher,
            name=f"expert-{i}",
            summary=f"words {i % 37} topic {i % 11}",
            domain=domain,
            base_model=base,
            download_count=i * 7 % 1000,
        )
        for i in range(500)
    )
    spec = describe(model)
    for expert in Expert.objects.filter(name__in=[f"expert-{i}" for i in GENERATED_EXPERTS]):
        data = expert_file_bytes(spec, n_latents=2, rank=2, seed=expert.pk)
        ExpertVersion.publish(
            expert, io.BytesIO(data), sha256=sha256_of(io.BytesIO(data)), size=len(data)
        )
    people = []
    for i in range(clients):
        user = get_user_model().objects.create_user(f"client{i}")
        _, key = ApiKey.create_for(user, "load")
        Expert.objects.create(owner=user, name="mine", domain=domain, base_model=base)
        people.append((key, f"/api/v1/experts/client{i}/mine/"))

    def unique_file():
        """An expert file with a nonce in its metadata: every upload is a distinct stored
        object, so a lost one cannot hide behind another's copy."""
        nonce = {"nonce": uuid.uuid4().hex}
        return expert_file_bytes(spec, n_latents=2, rank=2, metadata=nonce)

    return people, unique_file, base.slug, spec


def queue_training_job(service, key, base_slug):
    """A small training job on a fresh dataset, through the API as a user would."""
    from tests.factories import phrase_text

    form = {"name": "phrases", "file": ("p.txt", phrase_text(length=3000).encode(), "text/plain")}
    status, _ = request(service, key, "POST", "/api/v1/datasets/", encode_multipart_formdata(form))
    assert status == 201, status
    params = dict(steps=60, window=64, ahead_tokens=4, positions_per_window=4, n_latents=2)
    job = {"expert": "trained", "domain": "load", "datasets": ["phrases"], "params": params}
    status, answer = request(service, key, "POST", "/api/v1/jobs/training/", json.dumps(job))
    assert status == 202, (status, answer)
    return json.loads(answer)["id"]


# What deploy/nginx.conf sends to the serving process; the rest goes to the web process.
ROUTER_PATHS = ("/v1/", "/api/v1/generate", "/api/v1/attach")


@dataclasses.dataclass
class Service:
    """The service as production lays it out: pages and the API on gunicorn (``web``), the
    router on a uvicorn serving process (``serve``), a path going where nginx would send it."""

    web: int
    serve: int

    def port_for(self, path):
        return self.serve if path.startswith(ROUTER_PATHS) else self.web


class Connections:
    """One client's keep-alive connections, one per process it talks to, opened when needed."""

    def __init__(self, service):
        self.service, self.open = service, {}

    def to(self, path):
        port = self.service.port_for(path)
        if port not in self.open:
            self.open[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        return self.open[port]

    def close(self):
        for conn in self.open.values():
            conn.close()
        self.open.clear()


@contextlib.contextmanager
def serving(env, var_dir, web_workers):
    """gunicorn and a serving process up and answering; yields the Service; stops both. The
    web process hands "try it" to the serving process, as in production."""
    service = Service(free_port(), free_port())
    web_env = {**env, "LATENTRY_SERVING_URL": f"http://127.0.0.1:{service.serve}"}
    with open(var_dir / "server.log", "w+") as log:
        web = start_gunicorn(web_env, service.web, log, web_workers)
        serve = start_uvicorn(env, service.serve, log)
        try:
            wait_until_ready(web, service.web)
            wait_until_ready(serve, service.serve)
            yield service
        finally:
            stop(web)
            stop(serve)
            log.seek(0)
            problems = [line for line in log.read().splitlines() if "Error" in line]
            if problems:
                print("server log:\n" + "\n".join(problems[-20:]))


def request(service, key, method, path, body=None, conns=None, cookies=None):
    """``body``: JSON text, or (bytes, content type) from ``encode_multipart_formdata``; over
    ``conns`` (a client's Connections) or a connection of its own. With ``cookies`` (a
    signed-in session) instead of a key, as a browser: the CSRF token beside its cookie."""
    own = conns is None
    conns = conns or Connections(service)
    conn = conns.to(path)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if cookies:
        headers["Cookie"] = "; ".join(f"{name}={value}" for name, value in cookies.items())
        headers["X-CSRFToken"] = cookies["csrftoken"]
        headers["Referer"] = f"http://127.0.0.1:{service.web}/"
    if isinstance(body, tuple):
        body, headers["Content-Type"] = body
    elif body is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conns.close()


def arrivals(rng, deadline, rate=None):
    """Yield when the next request is due until ``deadline``: back to back, or (``rate``) at
    Poisson arrivals of that many a second, as people send them whatever the service is doing."""
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        if rate:
            next_at += rng.expovariate(rate)
            if next_at >= deadline:
                return
            time.sleep(max(0.0, next_at - time.monotonic()))
        yield


def client(
    service, person, upload, base_slug, deadline, stats, uploads, lock, seed_value, rate=None
):
    """A legitimate client: the MIX at ``arrivals``."""
    key, expert_path = person
    rng = random.Random(seed_value)
    conns = Connections(service)
    for _ in arrivals(rng, deadline, rate):
        kind = rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
        if kind == "read":
            path = rng.choice(
                [
                    "/api/v1/experts/?ordering=-download_count",
                    f"/api/v1/experts/?q=words+{rng.randrange(37)}",
                    f"/api/v1/experts/publisher/expert-{rng.randrange(500)}/",
                ]
            )
            args = ("GET", path)
        elif kind == "generate":
            chosen = rng.choice(GENERATED_EXPERTS)
            expert = f"publisher/expert-{chosen}" if rng.random() < 0.5 else ""
            body = {"base": base_slug, "expert": expert, "prompt": "w5 w6 w7", "max_new_tokens": 8}
            args = ("POST", "/api/v1/generate", json.dumps(body))
        else:
            form = {"file": ("e.safetensors", upload(), "application/octet-stream")}
            args = ("POST", expert_path + "versions/", encode_multipart_formdata(form))
        started = time.perf_counter()
        try:
            status, answer = request(service, key, *args, conns=conns)
        except (OSError, http.client.HTTPException):
            conns.close()  # the next request reconnects
            status, answer = None, b""
        elapsed = time.perf_counter() - started
        with lock:
            if status is not None and 200 <= status < 300:
                stats.add(elapsed, kind)
                if kind == "generate":
                    record_timings(stats, elapsed, json.loads(answer)["timings_ms"])
                if kind == "upload":
                    uploads.append((expert_path, json.loads(answer)["number"]))
            else:
                stats.errors += 1
                stats.failures.append(f"{args[0]} {args[1][:60]} -> {status}")
    conns.close()


def record_timings(stats, elapsed, timings_ms):
    """Where a generation's time went, as the router reports it (routing, queue, prefill,
    decode), and the rest: HTTP, authentication, limits, planning."""
    timings = {**timings_ms, "outside_ms": elapsed * 1000 - sum(timings_ms.values())}
    for key, ms in timings.items():
        stats.timings.setdefault(key, Stats(key.removesuffix("_ms"))).add(ms / 1000)


def timing_summary(stats):
    """p50 / p95 of each part of the generations' time, in ms."""
    return ", ".join(
        f"{part.name} {part.percentile_ms(50):.0f}/{part.percentile_ms(95):.0f}"
        for part in stats.timings.values()
    )


def run_step(service, people, upload, base_slug, clients, seconds, uploads):
    stats = Stats(f"{clients} clients")
    stats.failures, stats.timings = [], {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(
            target=client,
            args=(service, people[i], upload, base_slug, deadline, stats, uploads, lock, i),
        )
        for i in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats.seconds = time.perf_counter() - started
    return stats


def lost_writes(uploads, training_job_id):
    """Uploads answered 201 without a distinct version row whose file reads back, rows no
    answer accounts for, numbers answered twice; and a training job that did not succeed."""
    from collections import Counter

    from registry.models import ExpertVersion
    from training.models import TrainingJob

    lost = 0
    answered = Counter(uploads)
    lost += sum(n - 1 for n in answered.values())  # one number answered twice
    for expert_path in {path for path, _ in uploads}:
        owner, name = expert_path.strip("/").split("/")[-2:]
        rows = {
            v.number: v
            for v in ExpertVersion.objects.filter(expert__owner__username=owner, expert__name=name)
        }
        numbers = {number for path, number in answered if path == expert_path}
        lost += len(numbers ^ rows.keys())  # answered without a row, or a row unanswered
        for number in numbers & rows.keys():
            try:
                rows[number].read_verified()
            except Exception as exc:  # missing or altered file
                print(f"{expert_path} v{number}: {exc}")
                lost += 1
    if training_job_id is None:
        return lost
    job = TrainingJob.objects.get(pk=training_job_id)
    print(f"training job {job.pk}: {job.status} {job.error}")
    return lost + (job.status != TrainingJob.SUCCEEDED)


# --- the abusive share ----------------------------------------------------------------------

ABUSER_QUOTA = 8 * 1024 * 1024  # LATENTRY_MAX_STORED_BYTES during the abuse run
ABUSER_ACTIVE_JOBS = 3  # LATENTRY_MAX_ACTIVE_JOBS during the abuse run
ABUSE = [
    "hostile",
    "hoard",
    "oversized",
    "deep",
    "download",
    "job",
    "page_job",
    "many_keys",
]
DEEP = "[" * 200_000 + "]" * 200_000  # a RecursionError for a recursive JSON parser
DEEP_PATHS = ["/api/v1/generate", "/v1/chat/completions", "/api/v1/jobs/training/"]


def abuse_environment(args, var_dir):
    """The load run's environment with the limits on that abusers meet: uploads 60/hour, job
    starts 30/hour and 3 active, a small storage quota, and generation at the service's own
    defaults (120 a minute per user, 4 at a time): the paced legitimate clients ask for about
    60 a minute each."""
    env = environment(args, var_dir)
    env.update(
        LATENTRY_GENERATE_RATE="120/min",
        LATENTRY_UPLOAD_RATE="60/hour",
        LATENTRY_JOB_START_RATE="30/hour",
        LATENTRY_MAX_ACTIVE_JOBS=str(ABUSER_ACTIVE_JOBS),
        LATENTRY_MAX_STORED_BYTES=str(ABUSER_QUOTA),
        # The abusers' slow receiver listens on loopback, which hooks may not name elsewhere.
        LATENTRY_WEBHOOK_ALLOWED_NETWORKS="127.0.0.1/32",
        LATENTRY_WEBHOOK_QUEUE="load-webhooks",
    )
    return env


def seed_abusers(count, spec, receiver_url):
    """Abusive accounts and their requests, built before the clock starts. Each account has
    as many API keys as it may hold, an expert to hoard versions in (its hook, on the slow
    receiver, hears of each), a dataset to start jobs on, and a signed-in session for the
    training page. Requests: hostile files (NaN values, 5,000 tensors, a config nested 100,000
    deep, a pickle), distinct valid 1 MB files to hoard storage with, a 3 MB JSON body, JSON
    bodies nested 200,000 deep."""
    import pickle

    import torch
    from django.contrib.auth import get_user_model

    from registry.models import ApiKey, BaseModel, Domain, Expert
    from tests.factories import expert_file_bytes, make_dataset, phrase_text
    from webhooks.models import Webhook

    base, domain = BaseModel.objects.get(), Domain.objects.get(slug="load")
    accounts = []
    for i in range(count):
        user = get_user_model().objects.create_user(f"abuser{i}")
        Expert.objects.create(owner=user, name="hoard", domain=domain, base_model=base)
        dataset = make_dataset(user, "junk", text=phrase_text(length=3000, seed=i))
        Webhook.create_for(user, receiver_url, ["version.published"])
        accounts.append(Account(f"abuser{i}", all_keys(user, ApiKey), session(user), dataset.pk))
    nan = torch.randn(2, spec.hidden_size)
    nan[1, 3] = float("nan")
    hostile = [
        expert_file_bytes(spec, n_latents=2, tensors={"soft_tokens": nan}),
        expert_file_bytes(spec, tensors={f"x.{i}": torch.zeros(1) for i in range(5000)}),
        expert_file_bytes(spec, metadata={"config": "[" * 100_000 + "]" * 100_000}),
        pickle.dumps({"soft_tokens": [0.0] * 4096}),
    ]
    hoard = [  # more than the quota holds: each account stops at 8
        expert_file_bytes(spec, n_latents=2, rank=1024, metadata={"nonce": uuid.uuid4().hex})
        for _ in range(12 * count)
    ]
    oversized = json.dumps(
        {"base": base.slug, "prompt": "w5 " * 1_000_000, "max_new_tokens": 8}
    ).encode()
    return Abuse(accounts, [multipart(data) for data in hostile], hoard, oversized)


def all_keys(user, api_key):
    """As many keys as ``user`` may hold: the cap refuses the next (fair use is per user)."""
    from django.core.exceptions import ValidationError

    keys = []
    while len(keys) < 1000:
        try:
            keys.append(api_key.create_for(user, f"key {len(keys)}")[1])
        except ValidationError:
            return keys
    raise AssertionError("no cap on a user's API keys")


def session(user):
    """A signed-in session cookie and a CSRF secret for the pages, as a browser would hold."""
    from django.middleware.csrf import _get_new_csrf_string
    from django.test import Client

    client = Client()
    client.force_login(user)
    return {"sessionid": client.cookies["sessionid"].value, "csrftoken": _get_new_csrf_string()}


@dataclasses.dataclass
class Account:
    name: str
    keys: list  # all the API keys it may hold
    cookies: dict  # a signed-in session
    dataset_pk: int


@dataclasses.dataclass
class Abuse:
    accounts: list
    hostile: list  # multipart bodies
    hoard: list  # file bytes, used up one by one
    oversized: bytes


MANY_KEYS_BURST = 8  # generations at once, over the per-user limit of 4 (default)


def burst(service, keys):
    """One generation per key, all at once, each on its own connection; their statuses."""
    body = json.dumps({"base": "tiny-llama", "prompt": "w5 w6 w7", "max_new_tokens": 8})
    statuses = [None] * len(keys)

    def ask(i, key):
        try:
            statuses[i] = request(service, key, "POST", "/api/v1/generate", body)[0]
        except (OSError, http.client.HTTPException):
            statuses[i] = "closed"

    threads = [threading.Thread(target=ask, args=(i, key)) for i, key in enumerate(keys)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def training_form(account):
    """The training page's form, urlencoded: a small job on the account's dataset."""
    from urllib.parse import urlencode

    fields = dict(
        datasets=account.dataset_pk,
        time_budget_minutes=1,
        steps=10,
        n_latents=2,
        prefix_positions=4,
        lora_rank=2,
        window=64,
        ahead_tokens=4,
        positions_per_window=4,
        lr=0.001,
    )
    return urlencode(fields).encode(), "application/x-www-form-urlencoded"


def multipart(data):
    return encode_multipart_formdata({"file": ("e.safetensors", data, "application/octet-stream")})


def abuser(service, account, abuse, rate, deadline, outcomes, uploads, lock, seed_value):
    """At Poisson arrivals of ``rate`` a second, at random: hostile uploads, hoarding valid
    ones, 3 MB and 200,000-deep JSON bodies, loops of downloads, of job starts through the API
    and through the training page, and generations spread over all the account's keys.
    Records (kind, status) and the 201 uploads."""
    rng = random.Random(seed_value)
    conns = Connections(service)
    versions = f"/api/v1/experts/{account.name}/hoard/versions/"
    for _ in arrivals(rng, deadline, rate):
        kind = rng.choice(ABUSE)
        with lock:
            hoarded = abuse.hoard.pop() if kind == "hoard" and abuse.hoard else None
        key, cookies = account.keys[0], None
        if kind in ("hostile", "hoard"):  # hostile once the hoard is spent
            body = multipart(hoarded) if hoarded else rng.choice(abuse.hostile)
            args = ("POST", versions, body)
        elif kind == "oversized":
            args = ("POST", "/api/v1/generate", abuse.oversized)
        elif kind == "deep":
            args = ("POST", rng.choice(DEEP_PATHS), DEEP)
        elif kind == "download":
            args = ("GET", "/api/v1/experts/publisher/expert-0/versions/1/download/")
        elif kind == "job":
            params = {"steps": 10, "window": 64, "ahead_tokens": 4, "positions_per_window": 4}
            job = {"expert": "hoard", "datasets": ["junk"], "params": params}
            args = ("POST", "/api/v1/jobs/training/", json.dumps(job))
        elif kind == "page_job":
            key, cookies = None, account.cookies
            args = ("POST", f"/experts/{account.name}/hoard/train/", training_form(account))
        else:  # many_keys: a burst of generations at once, each with another key
            statuses = burst(service, rng.sample(account.keys, MANY_KEYS_BURST))
            with lock:
                outcomes += [(kind, status) for status in statuses]
            continue
        try:
            status, answer = request(service, key, *args, conns=conns, cookies=cookies)
        except (OSError, http.client.HTTPException):  # the server closed an unread body
            conns.close()
            status, answer = "closed", b""
        with lock:
            outcomes.append((kind, status))
            if kind == "hoard" and status == 201:
                number = json.loads(answer)["number"]
                uploads.append((versions.removesuffix("versions/"), number))
    conns.close()


def abusers_process(service, abuse, args, deadline, results):
    """The abusive clients in a process of their own, so that their work in the client (bodies
    of megabytes) does not hold the legitimate clients' interpreter lock."""
    outcomes, uploads, lock = [], [], threading.Lock()
    threads = [
        threading.Thread(
            target=abuser,
            args=(service, account, abuse, args.abuser_rate, deadline, outcomes, uploads, lock, n),
        )
        for n, account in enumerate(abuse.accounts * args.abuser_threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put((outcomes, uploads))


def legit_phase(service, people, upload, base_slug, args, uploads, abuse=None):
    """``args.legit_clients`` paced clients for ``args.seconds``, beside the abusers if given;
    returns the legitimate clients' Stats and the abusers' outcomes."""
    import multiprocessing

    stats = Stats("with abusers" if abuse else "alone")
    stats.failures, stats.timings = [], {}
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds
    threads = [
        threading.Thread(
            target=client,
            args=(service, people[i], upload, base_slug, deadline, stats, uploads, lock, i),
            kwargs={"rate": args.legit_rate},
        )
        for i in range(args.legit_clients)
    ]
    if abuse:
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        process = context.Process(
            target=abusers_process, args=(service, abuse, args, deadline, results)
        )
        process.start()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats.seconds = time.perf_counter() - started
    outcomes = []
    if abuse:
        outcomes, hoarded = results.get(timeout=120)
        process.join()
        uploads += hoarded
    return stats, outcomes


def abuse_run(args):
    """Legitimate clients alone, then beside abusive accounts; their errors and p95, what the
    abusers got answered and hold at the end, and lost writes."""
    from collections import Counter

    with tempfile.TemporaryDirectory(prefix="latentry-abuse-") as tmp:
        var_dir = Path(tmp)
        env = fresh_service(args, var_dir, abuse_environment)
        people, upload, base_slug, spec = seed(args.legit_clients, var_dir)
        receiver = DrippingReceiver()
        abuse = seed_abusers(args.abusers, spec, receiver.url)
        from tests.factories import Worker  # after migrate() set Django up

        # The deliveries' own worker; no job worker: started jobs stay active, so the count at
        # the end is the most any abuser ever held.
        hooks = Worker(env["LATENTRY_WEBHOOK_QUEUE"], env, "hooks", var_dir / "hooks.log")
        try:
            with serving(env, var_dir, args.web_workers) as service:
                uploads = []
                warm = argparse.Namespace(**{**vars(args), "seconds": min(5, args.seconds)})
                legit_phase(service, people, upload, base_slug, warm, uploads)
                alone, _ = legit_phase(service, people, upload, base_slug, args, uploads)
                beside, outcomes = legit_phase(
                    service, people, upload, base_slug, args, uploads, abuse
                )
        finally:
            hooks.stop()
            receiver.close()
        lost = lost_writes(uploads, None)
        held, over_cap = abusers_hold()
    for stats in (alone, beside):
        print(
            f"legitimate, {stats.name}: {stats.rps:6.1f} req/s, p50 {stats.percentile_ms(50):5.0f}"
            f" ms, p95 {stats.percentile_ms(95):5.0f} ms, errors {stats.errors}"
            + (f" ({stats.failures[:3]})" if stats.errors else "")
        )
        for kind, of_kind in sorted(stats.by_kind.items()):
            print(
                f"  {kind:8} {len(of_kind.latencies):5} answered, p50 "
                f"{of_kind.percentile_ms(50):5.0f} ms, p95 {of_kind.percentile_ms(95):5.0f} ms"
            )
        print(f"  generation's parts, p50/p95 ms: {timing_summary(stats)}")
    answered = Counter(outcomes)
    for kind in ABUSE:
        statuses = {status: n for (k, status), n in sorted(answered.items(), key=str) if k == kind}
        print(f"abusers' {kind}: {statuses}")
    print(f"abusers hold {held} bytes; quota {ABUSER_QUOTA}")
    print(f"abusers' active jobs over the cap of {ABUSER_ACTIVE_JOBS}: {over_cap}")
    print(
        f"slow receiver: {len(receiver.held_s)} delivery attempts, the longest held "
        f"{max(receiver.held_s, default=0):.1f} s"
    )
    print(f"{len(uploads)} uploads answered 201 (legitimate and hoarded); lost writes {lost}")
    ratio = beside.percentile_ms(95) / alone.percentile_ms(95)
    print(
        f"RESULT legit_errors={beside.errors + alone.errors} legit_p95_ratio={ratio:.2f} "
        f"abuser_bytes_stored={max(held.values())} "
        f"abuser_jobs_over_cap={max(over_cap.values())} lost_writes={lost}"
    )


def abusers_hold():
    """Per abuser: stored bytes, and active (unfinished) training jobs beyond the cap."""
    from django.contrib.auth import get_user_model

    from registry.quotas import stored_bytes
    from training.models import Job, TrainingJob

    abusers = get_user_model().objects.filter(username__startswith="abuser")
    held = {user.username: stored_bytes(user) for user in abusers}
    over_cap = {}
    for user in abusers:
        active = TrainingJob.objects.filter(created_by=user).exclude(status__in=Job.FINISHED)
        over_cap[user.username] = max(0, active.count() - ABUSER_ACTIVE_JOBS)
    return held, over_cap


class DrippingReceiver:
    """A webhook receiver on loopback that answers one byte every half second for a minute:
    what holds a delivery attempt open as long as the sender lets it. Records how long each
    attempt stayed connected."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        self.held_s = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn):
        started = time.monotonic()
        try:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\n" * 8:
                conn.sendall(bytes([byte]))
                time.sleep(0.5)
        except OSError:  # the sender gave up: what we measure
            pass
        finally:
            self.held_s.append(time.monotonic() - started)
            conn.close()

    def close(self):
        self.listener.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--p95-ms", type=float, default=1000)
    p.add_argument("--steps", default="1,2,4,8,16,32,64,128")
    p.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    p.add_argument("--abuse", action="store_true", help="the abusive-share run instead")
    p.add_argument("--legit-clients", type=int, default=4)
    p.add_argument("--legit-rate", type=float, default=5.0, help="requests/s per legit client")
    p.add_argument("--abusers", type=int, default=3, help="abusive accounts")
    p.add_argument("--abuser-threads", type=int, default=2, help="clients per abusive account")
    p.add_argument("--abuser-rate", type=float, default=5.0, help="requests/s per abusive client")
    add_web_workers_argument(p)
    add_smoke_argument(p)
    args = parse(p, SMOKE)
    if args.abuse:
        return abuse_run(args)
    steps = [int(s) for s in args.steps.split(",")]
    print(f"steps {steps} x {args.seconds:.0f}s; bound p95 < {args.p95_ms:.0f} ms, no errors")

    with tempfile.TemporaryDirectory(prefix="latentry-load-") as tmp:
        var_dir = Path(tmp)
        env = fresh_service(args, var_dir, environment)
        people, upload, base_slug, _ = seed(max(steps), var_dir)
        from tests.factories import Worker, wait_for  # after migrate() set Django up

        worker = Worker("load", env, name="load", log_path=var_dir / "worker.log")
        try:
            with serving(env, var_dir, args.web_workers) as service:
                job_id = queue_training_job(service, people[0][0], base_slug)
                results, uploads = [], []
                for clients in steps:
                    stats = run_step(
                        service, people, upload, base_slug, clients, args.seconds, uploads
                    )
                    results.append(stats)
                    print(
                        f"{clients:3} clients: {stats.rps:7.1f} req/s, p50 "
                        f"{stats.percentile_ms(50):6.0f} ms, p95 {stats.percentile_ms(95):6.0f} ms,"
                        f" errors {stats.errors}"
                        + (f" ({stats.failures[:3]})" if stats.errors else "")
                    )
                    if stats.errors or stats.percentile_ms(95) > args.p95_ms:
                        break
                from training.models import TrainingJob

                with contextlib.suppress(AssertionError):  # a job still running counts as lost
                    wait_for(lambda: TrainingJob.objects.get(pk=job_id).finished, timeout=120)
        finally:
            worker.stop()
            lines = (var_dir / "worker.log").read_text(errors="replace").splitlines()
            if problems := [line for line in lines if "Error" in line]:
                print("worker log:\n" + "\n".join(problems[-20:]))
        lost = lost_writes(uploads, job_id)

    sustained = [s for s in results if not s.errors and s.percentile_ms(95) <= args.p95_ms]
    print(f"{len(uploads)} uploads answered 201; lost writes {lost}")
    if sustained:  # the highest concurrency that held
        best = sustained[-1]
        print(f"sustained: {best.name}")
        rps, errors = best.rps, best.errors
    else:
        print("sustained: none (even the first step broke the bound)")
        rps, errors = 0.0, results[0].errors
    print(f"RESULT sustained_rps={rps:.1f} errors={errors} lost_writes={lost}")


if __name__ == "__main__":
    main()
