"""Load on the REST API: catalog, search, expert detail, leaderboards and aliases against a
trivial endpoint.

What it measures: requests/s and p50/p95 latency of the read endpoints a visitor hits most
(the catalog list, the catalog by downloads, search, one expert, a domain's leaderboard page, a
version named by its alias), each under the same number of
concurrent clients for the same time, next to ``GET /api/v1/health/`` on the same server. The
health check goes through the same middleware and DRF view stack but does no database work, so it
is the framework's floor; the catalog is reported as a ratio of it.

How:

1. Drop and re-create a PostgreSQL database (``latentry_bench`` by default), migrate it with
   production settings (``DEBUG=false``), and seed it with bulk inserts: users, domains, base
   models with real-sized parameter tables, and 10,000 experts of mixed visibility (80% public,
   10% unlisted, 10% private) with heavy-tailed downloads, ratings, measured gains, ages and
   versions, so that ordering, filtering and the "latest version" subquery have real work to do;
   a benchmark per domain, benchmark figures on 70% of the ready versions (so each leaderboard
   ranks a few hundred experts), and a ``stable`` alias on half the experts with versions.
2. Serve ``config.wsgi`` with gunicorn on a free local port, as production would: its
   processes share one Redis cache (``--cache-url``, emptied first; ``--cache-url ""`` gives
   each process its own memory instead). The server's environment is this one's plus those
   settings, so ``LATENTRY_CATALOG_CACHE_SECONDS=0`` in front of the command measures the
   catalog, searches and leaderboards built afresh for every request.
3. Drive each endpoint with ``--clients`` threads, each with its own keep-alive ``http.client``
   connection, recording each request's latency and counting non-2xx answers and exceptions as
   errors. The ``--seconds`` per endpoint are split over ``--rounds`` rounds that visit every
   endpoint in turn, so background load hits all alike. The client shares the cores with the
   server and PostgreSQL, so it is kept cheap: threads, persistent connections, no JSON decoding.

Usage::

    .venv/bin/python bench/api_load.py [--seconds 20] [--rounds 4] [--clients 16]
        [--experts 10000] [--database-url postgres://postgres@127.0.0.1:5432/latentry_bench]
        [--cache-url redis://127.0.0.1:6379/7]

After the load, the router's lookup of a named version (``inference.choose.named``, the one
query the router path makes for ``owner/name@ref``) is timed in this process, by alias and by
number, ``--lookups`` times each, alternating.

The last line is ``RESULT catalog_rps_vs_floor=<ratio> search_p95_ms=<ms>
leaderboard_p95_ms=<ms> alias_lookup_vs_number=<ratio> errors=<n>``; the targets are a catalog at
least 0.5x the floor's requests/s, search p95 at most 50 ms, and zero errors.
"""

import argparse
import http.client
import os
import platform
import random
import tempfile
import threading
import time
from pathlib import Path

from common import (
    GUNICORN_THREADS,
    Stats,
    add_smoke_argument,
    add_web_workers_argument,
    free_port,
    migrated_database,
    parse,
    server_env,
    start_gunicorn,
    stop,
    wait_until_ready,
)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/latentry_bench"
SMOKE = dict(
    seconds=0.2,
    rounds=1,
    clients=2,
    experts=200,
    lookups=20,
    web_workers=1,
    database_url=DEFAULT_DATABASE_URL + "_smoke",
)
DEFAULT_CACHE_URL = "redis://127.0.0.1:6379/7"  # bench/load.py uses 5 and 6

TOPICS = {
    "code": ["refactoring", "compiler", "rust", "typescript", "kernel", "sql", "regex", "api"],
    "python": ["asyncio", "numpy", "pandas", "django", "typing", "pytest", "packaging", "stdlib"],
    "science": ["physics", "chemistry", "astronomy", "climate", "geology", "optics", "energy"],
    "biomed": ["protein", "genomics", "oncology", "radiology", "cardiology", "pharmacology"],
    "math": ["algebra", "topology", "calculus", "proofs", "statistics", "combinatorics"],
    "law": ["contract", "patent", "privacy", "employment", "tax", "litigation", "gdpr"],
    "finance": ["accounting", "derivatives", "audit", "banking", "valuation", "crypto"],
    "general": ["cooking", "travel", "writing", "history", "music", "gardening", "sports"],
}
KINDS = ["expert", "helper", "tutor", "reviewer", "assistant", "explainer", "notes", "qa"]
FILLER = ["fast", "careful", "concise", "detailed", "multilingual", "beginner", "advanced"]
BASE_MODELS = [
    ("smollm2-135m-instruct", "LlamaForCausalLM", 576, 30, 49152),
    ("smollm2-360m-instruct", "LlamaForCausalLM", 960, 32, 49152),
    ("qwen2.5-0.5b-instruct", "Qwen2ForCausalLM", 896, 24, 151936),
    ("llama-3.2-1b-instruct", "LlamaForCausalLM", 2048, 16, 128256),
    ("gemma-2-2b-it", "Gemma2ForCausalLM", 2304, 26, 256000),
]
SEARCH_WORDS = [w for words in TOPICS.values() for w in words] + KINDS + ["missing-word"]


# --- database -------------------------------------------------------------------------------


def seed(n_experts, rng):
    """Fill the database with production settings (Django set up by ``migrated_database``); return
    the URLs of the public experts."""
    from django.db import connection

    seed_domains()
    users = seed_users(200)
    base_models = seed_base_models()
    experts = seed_experts(n_experts, users, base_models, rng)
    seed_versions(experts, rng)
    seed_benchmarks(users[0])
    seed_aliases(rng)
    with connection.cursor() as cursor:
        # auto_now_add stamps every row with the same instant; spread them over a year.
        cursor.execute("SELECT setseed(0.42)")
        cursor.execute(
            "UPDATE registry_expert SET created_at = now() - random() * interval '365 days'"
        )
        # Compact the table the UPDATE doubled, then do what autovacuum does soon after a bulk
        # load: statistics for the planner, and the visibility map for index-only counts.
        cursor.execute("VACUUM FULL registry_expert")
        cursor.execute("VACUUM ANALYZE")
    connection.close()
    public = [e for e in experts if e.visibility == e.PUBLIC]
    return [f"/api/v1/experts/{e.owner.username}/{e.name}/" for e in public]


def seed_domains():
    from registry.models import Domain

    Domain.objects.bulk_create(Domain(slug=slug, name=slug.title()) for slug in TOPICS)


def seed_users(n):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password

    User = get_user_model()
    unusable = make_password(None)
    User.objects.bulk_create(User(username=f"user{i:03d}", password=unusable) for i in range(n))
    return list(User.objects.filter(username__startswith="user"))


def seed_base_models():
    from registry.models import BaseModel

    BaseModel.objects.bulk_create(
        BaseModel(
            slug=slug,
            source=f"hub/{slug}",
            architecture=arch,
            hidden_size=hidden,
            num_layers=layers,
            vocab_size=vocab,
            fingerprint=f"{i:064x}",
            param_shapes=llama_param_shapes(hidden, layers, vocab),
        )
        for i, (slug, arch, hidden, layers, vocab) in enumerate(BASE_MODELS)
    )
    return list(BaseModel.objects.all())


def llama_param_shapes(hidden, layers, vocab):
    """What describe() stores for a real decoder: one entry per weight tensor."""
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden]}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}.self_attn.{name}.weight"] = [hidden, hidden]
        for name in ("gate_proj", "up_proj"):
            shapes[f"{prefix}.mlp.{name}.weight"] = [4 * hidden, hidden]
        shapes[f"{prefix}.mlp.down_proj.weight"] = [hidden, 4 * hidden]
        shapes[f"{prefix}.input_layernorm.weight"] = [hidden]
        shapes[f"{prefix}.post_attention_layernorm.weight"] = [hidden]
    return shapes


def seed_experts(n, users, base_models, rng):
    from registry.models import Domain, Expert

    domains = {d.slug: d for d in Domain.objects.all()}
    visibility = [Expert.PUBLIC] * 8 + [Expert.UNLISTED, Expert.PRIVATE]
    experts = []
    for i in range(n):
        domain = rng.choice(list(TOPICS))
        topic, kind = rng.choice(TOPICS[domain]), rng.choice(KINDS)
        rated = rng.random() < 0.7
        experts.append(
            Expert(
                owner=users[i % len(users)],
                name=f"{topic}-{kind}-{i}",
                title=f"{topic.title()} {kind} ({rng.choice(FILLER)})",
                summary=" ".join(rng.choices(TOPICS[domain] + FILLER + KINDS, k=12)),
                model_card=f"# {topic}\n\n" + "Trained on curated data. " * 20,
                domain=domains[domain],
                base_model=rng.choice(base_models),
                visibility=rng.choice(visibility),
                tags=rng.sample(TOPICS[domain], 3),
                download_count=int(rng.paretovariate(1.1) * 10),
                rating=round(rng.uniform(1, 5), 1) if rated else None,
                review_count=rng.randint(1, 40) if rated else 0,
                measured_gain=round(rng.uniform(0, 25), 2) if rng.random() < 0.6 else None,
            )
        )
    return Expert.objects.bulk_create(experts, batch_size=2000)


def seed_versions(experts, rng):
    from registry.models import ExpertVersion

    versions = []
    for expert in experts:
        for number in range(1, rng.choice([0, 1, 1, 2, 3]) + 1):
            digest = f"{expert.pk:032x}{number:032x}"
            versions.append(
                ExpertVersion(
                    expert=expert,
                    number=number,
                    artifact_key=f"experts/{digest}.safetensors",
                    sha256=digest,
                    size=rng.randint(10**5, 10**8),
                    kind="lora",
                    n_latents=16,
                    status=ExpertVersion.READY if rng.random() < 0.9 else ExpertVersion.REJECTED,
                    **benchmark_figures(rng),
                )
            )
    ExpertVersion.objects.bulk_create(versions, batch_size=5000)


def benchmark_figures(rng):
    """What the platform's benchmark measurements leave on 70% of the versions."""
    from django.utils import timezone

    if rng.random() >= 0.7:
        return {}
    return {
        "benchmark_gain": round(rng.uniform(-2, 25), 3),
        "off_domain_change": round(rng.uniform(-3, 10), 3),
        "latency_ratio": round(rng.uniform(1.0, 1.3), 3),
        "benchmarked_at": timezone.now(),
    }


def seed_benchmarks(staff):
    """A benchmark per domain: a staff user's private dataset row (its file is never read)."""
    from registry.models import Domain
    from training.models import Benchmark, Dataset

    staff.is_staff = True
    staff.save(update_fields=["is_staff"])
    benchmarks = [
        Benchmark(
            domain=domain,
            dataset=Dataset.objects.create(
                owner=staff,
                name=f"{domain.slug}-bench",
                format=Dataset.TEXT,
                file_key=f"datasets/{domain.pk:064x}.txt",
                sha256=f"{domain.pk:064x}",
                size=10**6,
                token_count=250_000,
            ),
        )
        for domain in Domain.objects.all()
    ]
    Benchmark.objects.bulk_create(benchmarks)  # bulk: no signals, so nothing is queued


def seed_aliases(rng):
    """``stable`` on version 1 of half the experts that have one."""
    from registry.models import ExpertVersion, VersionAlias

    firsts = ExpertVersion.objects.filter(number=1, status=ExpertVersion.READY)
    VersionAlias.objects.bulk_create(
        VersionAlias(expert_id=v.expert_id, name="stable", version=v)
        for v in firsts.only("pk", "expert_id")
        if rng.random() < 0.5
    )


# --- server ---------------------------------------------------------------------------------


# --- load -----------------------------------------------------------------------------------


def client(port, paths, deadline, stats, lock, seed):
    """One client: a keep-alive connection, requests back to back until the deadline."""
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies, errors = [], 0
    while time.perf_counter() < deadline:
        path = rng.choice(paths)
        start = time.perf_counter()
        try:
            conn.request("GET", path, headers={"Accept": "application/json"})
            response = conn.getresponse()
            response.read()
            ok = 200 <= response.status < 300
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()  # the next request reconnects
        if ok:
            latencies.append(time.perf_counter() - start)
        else:
            errors += 1
    conn.close()
    with lock:
        stats.latencies += latencies
        stats.errors += errors


def drive(port, stats, paths, clients, seconds):
    """Run ``clients`` concurrent clients over ``paths`` for ``seconds``, adding to ``stats``."""
    lock = threading.Lock()
    start = time.perf_counter()
    threads = [
        threading.Thread(target=client, args=(port, paths, start + seconds, stats, lock, i))
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats.seconds += time.perf_counter() - start


def endpoints(detail_paths, alias_paths, rng):
    searches = [f"/api/v1/experts/?q={word}" for word in SEARCH_WORDS]
    details = rng.sample(detail_paths, min(2000, len(detail_paths)))
    leaderboards = [f"/domains/{slug}/leaderboard/" for slug in TOPICS]
    by_alias = rng.sample(alias_paths, min(2000, len(alias_paths)))
    return [
        ("floor /health/", ["/api/v1/health/"]),
        ("catalog", ["/api/v1/experts/"]),
        ("catalog by downloads", ["/api/v1/experts/?ordering=-download_count"]),
        ("search ?q=", searches),
        ("expert detail", details),
        ("leaderboard page", leaderboards),
        ("version @stable", by_alias),
    ]


def alias_paths():
    """The API path of every public expert's version named by alias."""
    from registry.models import Expert, VersionAlias

    aliases = VersionAlias.objects.filter(expert__visibility=Expert.PUBLIC)
    return [
        f"/api/v1/experts/{owner}/{name}/versions/stable/"
        for owner, name in aliases.values_list("expert__owner__username", "expert__name")
    ]


def time_lookups(n, rng):
    """Seconds per ``choose.named`` of a version, by alias and by number, alternating: the
    router's one query for ``owner/name@ref``."""
    from inference import choose
    from registry.models import VersionAlias

    aliases = list(
        VersionAlias.objects.select_related("expert__owner", "expert__base_model", "version")
    )
    by_alias, by_number = Stats("router lookup @stable"), Stats("router lookup @1")
    for _ in range(n):
        alias = rng.choice(aliases)
        name, base = f"{alias.expert.owner.username}/{alias.expert.name}", alias.expert.base_model
        for stats, ref in ((by_alias, "stable"), (by_number, str(alias.version.number))):
            start = time.perf_counter()
            choice = choose.named(f"{name}@{ref}", base, alias.expert.owner)
            stats.latencies.append(time.perf_counter() - start)
            stats.seconds += stats.latencies[-1]
            assert choice.version.pk == alias.version_id, choice.reason
    return [by_alias, by_number]


def serve_and_drive(env, log, plan, args):
    """Start gunicorn, drive the endpoints of the plan in rounds, always stop gunicorn.

    Each round gives every endpoint its share of the time, so a change in background load
    during the run falls on all of them alike and leaves the ratios alone.
    """
    port = free_port()
    server = start_gunicorn(env, port, log, args.web_workers)
    try:
        wait_until_ready(server, port)
        for _, paths in plan:  # open every worker thread's DB connection, warm every code path
            drive(port, Stats("warm-up"), paths, args.clients, min(1, args.seconds))
        results = [Stats(name) for name, _ in plan]
        for _ in range(args.rounds):
            for stats, (_, paths) in zip(results, plan, strict=True):
                drive(port, stats, paths, args.clients, args.seconds / args.rounds)
        return results
    finally:
        stop(server)


# --- report ---------------------------------------------------------------------------------


def print_settings(args):
    import django

    print(
        f"experts={args.experts} clients={args.clients} seconds={args.seconds} per endpoint "
        f"in {args.rounds} rounds"
    )
    print(f"database={args.database_url} cache={args.cache_url or 'per-process memory'}")
    print(
        f"gunicorn config.wsgi workers={args.web_workers} gthread threads={GUNICORN_THREADS}; "
        f"cpus={os.cpu_count()} python={platform.python_version()} django={django.__version__}"
    )


def print_table(results):
    print(f"{'endpoint':<22} {'requests':>9} {'rps':>8} {'p50 ms':>8} {'p95 ms':>8} {'errors':>7}")
    for s in results:
        print(
            f"{s.name:<22} {len(s.latencies) + s.errors:>9} {s.rps:>8.1f} "
            f"{s.percentile_ms(50):>8.2f} {s.percentile_ms(95):>8.2f} {s.errors:>7}"
        )


def prepare(args, var_dir):
    """A fresh, migrated, seeded database; return the server's environment and detail URLs."""
    (var_dir / "staticfiles").mkdir()  # whitenoise warns in every worker when it is missing
    env = server_env(args.database_url, args.cache_url, var_dir)
    started = time.perf_counter()
    if args.cache_url:
        import redis

        redis.Redis.from_url(args.cache_url).flushdb()
    migrated_database(args.database_url, env)
    detail_paths = seed(args.experts, random.Random(0))
    print(f"seeded {args.experts} experts in {time.perf_counter() - started:.1f}s")
    from django.conf import settings

    print(f"LATENTRY_CATALOG_CACHE_SECONDS={settings.LATENTRY_CATALOG_CACHE_SECONDS}")
    return env, detail_paths, alias_paths()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="per endpoint")
    parser.add_argument("--rounds", type=int, default=4, help="the seconds are split over these")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--experts", type=int, default=10_000)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--cache-url", default=DEFAULT_CACHE_URL, help='"": per process')
    parser.add_argument("--lookups", type=int, default=2000, help="router lookups timed, each")
    add_web_workers_argument(parser)
    add_smoke_argument(parser)
    args = parse(parser, SMOKE)
    print_settings(args)

    with tempfile.TemporaryDirectory(prefix="latentry-bench-") as tmp:
        env, detail_paths, by_alias = prepare(args, Path(tmp))
        plan = endpoints(detail_paths, by_alias, random.Random(1))
        with open(Path(tmp) / "gunicorn.log", "w+") as log:
            try:
                results = serve_and_drive(env, log, plan, args)
            finally:
                log.seek(0)
                if problems := log.read().strip():
                    print(f"gunicorn log:\n{problems[-3000:]}")
        lookups = time_lookups(args.lookups, random.Random(2))

    print_table(results + lookups)
    floor, catalog, search, leaderboard = results[0], results[1], results[3], results[5]
    alias, number = lookups
    print(
        f"RESULT catalog_rps_vs_floor={catalog.rps / floor.rps:.2f} "
        f"search_p95_ms={search.percentile_ms(95):.1f} "
        f"leaderboard_p95_ms={leaderboard.percentile_ms(95):.1f} "
        f"alias_lookup_vs_number={alias.percentile_ms(50) / number.percentile_ms(50):.2f} "
        f"errors={sum(s.errors for s in results)}"
    )


if __name__ == "__main__":
    main()
