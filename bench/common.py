"""What the benches share, one home each: the smoke setting; the ML benches' threads, base
model, corpora and expert settings; the service benches' database, gunicorn and load statistics.

Every bench takes ``--smoke`` (or ``BENCH_SMOKE=1`` in the environment): its whole path in
seconds, on the tests' tiny decoder where the real base model is not the point, with a handful of
requests or steps. A smoke run still ends with the full run's ``RESULT`` keys; its figures
measure nothing (tests/test_benches.py runs every bench this way).
"""

import argparse
import copy
import gzip
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coprocessor import base_models, corpus  # noqa: E402
from coprocessor.train import TrainConfig  # noqa: E402

MODEL_CACHE = ROOT / "var" / "base_models" / base_models.DEFAULT_SLUG
SMOKE_DOCUMENTS = 40  # documents per corpus in a smoke run


# --- the smoke setting ------------------------------------------------------------------------


def add_smoke_argument(p):
    p.add_argument(
        "--smoke",
        action="store_true",
        default=os.environ.get("BENCH_SMOKE") == "1",
        help="the whole path in seconds on tiny inputs (or BENCH_SMOKE=1): measures nothing",
    )


def parse(p, smoke):
    """``p``'s arguments; in a smoke run, with the bench's ``smoke`` values in place of those
    given (the smoke settings are the bench's own, not the caller's)."""
    args = p.parse_args()
    if args.smoke:
        for name, value in smoke.items():
            if not hasattr(args, name):
                raise AttributeError(f"smoke setting for an unknown argument: {name}")
            setattr(args, name, value)
        print(f"smoke run (measures nothing): {smoke}")
    return args


# --- the ML benches ---------------------------------------------------------------------------


def parser(description):
    p = argparse.ArgumentParser(description=description)
    add_smoke_argument(p)
    p.add_argument("--text", help="a .txt or .jsonl corpus instead of the Python docs")
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("BENCH_THREADS", 2)),
        help="torch threads; more than the free cores slows CPU runs down",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def setup(args):
    """The base model and its tokenizer: SmolLM2-135M, or in a smoke run the tests' tiny llama
    (its word-level tokenizer reads most text as <unk>: enough to run every step)."""
    torch.set_num_threads(args.threads)
    if args.smoke:
        return smoke_model(args.device)
    started = time.perf_counter()
    model, tokenizer = base_models.load_default(MODEL_CACHE, device=args.device)
    print(
        f"base model {base_models.DEFAULT_SLUG} on {args.device}, loaded in "
        f"{time.perf_counter() - started:.1f} s, {args.threads} threads"
    )
    return model, tokenizer


def corpus_ids(args, tokenizer, name=None):
    """Token ids of the train and held-out parts of ``--text``, or of the named corpus
    (``domain_texts``; default the Python docs)."""
    if args.text and name is None:
        train, heldout = corpus.split_texts(corpus.read_texts(args.text))
        name = args.text
    else:
        name = name or "python-docs"
        texts = domain_texts(documents(args), only=name)[name]
        train, heldout = split_documents(texts)
    train_ids, heldout_ids = corpus.tokenize(tokenizer, train), corpus.tokenize(tokenizer, heldout)
    print(f"corpus {name}: {len(train_ids)} training tokens, {len(heldout_ids)} held-out")
    return train_ids, heldout_ids


def smoke_model(device):
    from tests.tiny import frozen, tiny_llama, word_tokenizer

    # Positions for the real benches' windows and prompts (rotary: a longer table costs nothing).
    model = frozen(lambda: tiny_llama(max_position_embeddings=4096))
    print("smoke run: the tests' tiny llama and word-level tokenizer")
    return model.to(device), word_tokenizer()


def split_documents(texts, heldout_every=10):
    """Every 10th document held out (the Python docs: by topic, as ``corpus.demo_split``)."""
    train = [text for i, text in enumerate(texts) if i % heldout_every]
    heldout = [text for i, text in enumerate(texts) if not i % heldout_every]
    return train, heldout


def documents(args):
    """How many documents a corpus gives this run: all, or a smoke run's few."""
    return SMOKE_DOCUMENTS if args.smoke else None


def domain_texts(limit=None, only=None):
    """Corpora of distinct domains that ship on this machine, as lists of documents (the first
    ``limit`` of each; ``only``: that corpus alone): the Python docs (``pydoc_data``), software
    licences, and the first 400 Unix manual pages of section 1. Those depend on the Debian
    packages installed (``make chromium`` adds some): the token counts the benches print tell
    which set a figure was measured on."""
    readers = {
        "python-docs": lambda: [text for _, text in corpus.pydoc_topics()][:limit],
        "licences": lambda: [
            p.read_text(errors="replace")
            for p in sorted(Path("/usr/share/common-licenses").glob("*"))[:limit]
        ],
        "unix-manuals": lambda: [
            strip_troff(m) for m in sorted(Path("/usr/share/man/man1").glob("*.1.gz"))[:400][:limit]
        ],
    }
    domains = {name: read() for name, read in readers.items() if only in (None, name)}
    return {name: texts for name, texts in domains.items() if texts}


def strip_troff(path):
    lines = []
    with gzip.open(path, "rt", errors="replace") as f:
        source = f.readlines()
    for line in source:
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            line = line.split(" ", 1)[1] if " " in line else ""
        lines.append(re.sub(r"\\f[A-Z]|\\f\(..|\\[-&|^e(]|\\\*\(..", "", line))
    return "".join(lines)


def add_expert_arguments(p):
    """The expert's shape and optimiser, shared by the benchmarks that train one; the defaults
    are TrainConfig's, so a bench measures what a job would train."""
    defaults = TrainConfig().settings()
    p.add_argument("--n-latents", type=int, default=defaults["n_latents"])
    p.add_argument("--ahead", type=int, default=defaults["ahead_tokens"])
    p.add_argument("--window", type=int, default=defaults["window"])
    p.add_argument(
        "--positions",
        type=int,
        default=defaults["positions_per_window"],
        help="augmentation points per window",
    )
    p.add_argument("--windows-per-step", type=int, default=defaults["windows_per_step"])
    p.add_argument("--lora-rank", type=int, default=defaults["lora_rank"])
    p.add_argument("--lr", type=float, default=defaults["lr"])
    p.add_argument("--gate-lr", type=float, default=defaults["gate_lr"])
    p.add_argument(
        "--prefix-positions",
        type=int,
        default=None,
        help="N_P of the static prefix (0: none; default: sized to the training tokens where "
        "the bench knows them, as a job does, else 64)",
    )
    p.add_argument("--prefix-lr", type=float, default=defaults["prefix_lr"])
    p.add_argument("--prefix-gate-init", type=float, default=defaults["prefix_gate_init"])
    p.add_argument("--prefix-snippets", type=int, default=defaults["prefix_snippets"])
    p.add_argument(
        "--replay-windows",
        type=int,
        default=defaults["replay_windows"],
        help="windows of D's own text per step (the off-domain anchor)",
    )
    p.add_argument("--replay-pool", type=int, default=defaults["replay_pool"])
    p.add_argument(
        "--min-lr-ratio",
        type=float,
        default=defaults["min_lr_ratio"],
        help="where the cosine decay ends, as a share of each learning rate (1: constant)",
    )
    p.add_argument(
        "--objective",
        default=defaults["objective"],
        help="the windows' loss: next_token, distill (KL to D reading the text before), mix",
    )
    p.add_argument("--teacher-context", type=int, default=defaults["teacher_context"])
    p.add_argument(
        "--evaluations",
        type=int,
        default=defaults["evaluations"],
        help="validation checks over the run (0: no watch, no early stop)",
    )
    p.add_argument("--patience", type=int, default=defaults["patience"])
    p.add_argument("--harm-bound", type=float, default=defaults["harm_bound_pct"])


def train_config(args, tokenizer, train_tokens=None, **overrides):
    """The TrainConfig those arguments describe; latents start from a space token; without
    --prefix-positions, the prefix is sized to ``train_tokens`` as a job sizes it."""
    settings = dict(
        n_latents=args.n_latents,
        ahead_tokens=args.ahead,
        window=args.window,
        positions_per_window=args.positions,
        windows_per_step=args.windows_per_step,
        lora_rank=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        lr=args.lr,
        gate_lr=args.gate_lr,
        prefix_lr=args.prefix_lr,
        prefix_gate_init=args.prefix_gate_init,
        prefix_snippets=args.prefix_snippets,
        replay_windows=args.replay_windows,
        replay_pool=args.replay_pool,
        min_lr_ratio=args.min_lr_ratio,
        objective=args.objective,
        teacher_context=args.teacher_context,
        evaluations=args.evaluations,
        patience=args.patience,
        harm_bound_pct=args.harm_bound,
        anchor_token_id=space_token(tokenizer),
    )
    if args.prefix_positions is not None:
        settings["prefix_positions"] = args.prefix_positions
    return TrainConfig.from_settings({**settings, **overrides}, train_tokens=train_tokens)


def budget_config(args, tokenizer, train_tokens, **overrides):
    """The TrainConfig of a run that ``--budget-min`` alone ends (its steps never do)."""
    return train_config(
        args,
        tokenizer,
        train_tokens=train_tokens,
        steps=100_000,
        time_budget_s=args.budget_min * 60,
        **overrides,
    )


def space_token(tokenizer):
    return base_models.space_token_id(tokenizer)


def peft_lora_copy(model, rank, alpha):
    """A PEFT LoRA fine-tune of a copy of ``model`` on every linear layer of its blocks: the
    baseline a user would pick instead of an expert (it changes the base)."""
    from peft import LoraConfig, get_peft_model

    targets = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n
        }
    )
    return get_peft_model(
        copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    )


# --- the service benches ----------------------------------------------------------------------

# One worker per core: the work is CPU-bound Python, and PostgreSQL and the clients need the same
# two cores. gthread rather than sync because sync closes the connection after every response:
# a TCP handshake per request on both sides cost the floor about 20% of its requests/s here,
# which would measure connection set-up rather than the framework. Two threads let a worker
# start one request while another waits on the database; 1, 2 and 4 threads measured the same
# within noise, and more only add GIL contention. The 16 keep-alive connections wait in each
# worker's poller between requests, not in a thread.
GUNICORN_WORKERS = 2
GUNICORN_THREADS = 2


def server_env(database_url, cache_url, var_dir):
    """The environment of migrate, the seeding and gunicorn: production settings, local DB."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url,
        "CACHE_URL": cache_url,
        "DEBUG": "false",
        "SECRET_KEY": "bench-only-secret-key-not-for-production-use-0123456789abcdef",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "LATENTRY_VAR_DIR": str(var_dir),
        "LOG_LEVEL": "WARNING",
    }


def migrated_database(database_url, env):
    """An empty, migrated database under the name in the URL, and Django set up on it in this
    process with ``env`` as its settings (the bench then seeds it through the same set-up).

    Migrating from nothing costs seconds; the first run leaves a copy of the migrated database
    as a template, named for the migrations it holds, and later runs copy it (PostgreSQL's
    ``CREATE DATABASE ... TEMPLATE``, a file copy) and find nothing left to apply."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(database_url)
    name = sql.Identifier(parts.path.lstrip("/"))
    template_name = f"latentry_bench_template_{migrations_digest()}"
    template = sql.Identifier(template_name)
    admin_url = urlunsplit(parts._replace(scheme="postgresql", path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        found = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [template_name]
        ).fetchone()
        if found:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(name, template))
        else:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
    migrate(env)
    if not found:
        from django.db import connections

        connections.close_all()  # a template is copied only while nobody is connected to it
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(template, name))


def migrations_digest():
    """A short hash of every app's migrations and Django's version: what a template holds."""
    import hashlib

    import django

    digest = hashlib.sha256(django.__version__.encode())
    for path in sorted(ROOT.glob("*/migrations/*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def migrate(env):
    """Migrate the database in this process, with ``env`` as its settings."""
    os.environ.update(env)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_web_workers_argument(p):
    p.add_argument(
        "--web-workers", type=int, default=GUNICORN_WORKERS, help="gunicorn worker processes"
    )


def start_gunicorn(env, port, log, workers=GUNICORN_WORKERS):
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "config.wsgi",
        f"--bind=127.0.0.1:{port}",
        f"--workers={workers}",
        "--worker-class=gthread",
        f"--threads={GUNICORN_THREADS}",
        "--keep-alive=30",
        "--graceful-timeout=10",
        "--log-level=warning",
    ]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def start_uvicorn(env, port, log):
    """A serving process, as production runs the router (``Procfile``'s ``serve``)."""
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "config.asgi:application",
        "--host=127.0.0.1",
        f"--port={port}",
        "--timeout-keep-alive=30",  # as gunicorn's: clients keep their connections between requests
        "--log-level=warning",
    ]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_until_ready(server, port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{server.args[2]} exited with {server.returncode}")
        try:
            if get(port, "/api/v1/health/") == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{server.args[2]} did not answer in time")


def stop(server):
    """SIGTERM lets the workers finish their requests; kill only if that hangs."""
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@dataclass
class Stats:
    name: str
    latencies: list = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    by_kind: dict = field(default_factory=dict)  # kind of request: its latencies

    def add(self, latency, kind=None):
        self.latencies.append(latency)
        if kind is not None:
            self.by_kind.setdefault(kind, Stats(kind, seconds=self.seconds)).latencies.append(
                latency
            )

    @property
    def rps(self):
        return len(self.latencies) / self.seconds

    def percentile_ms(self, p):
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]
