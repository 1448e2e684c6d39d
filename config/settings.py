"""Latentry settings: one flat module, every value read from the environment.

The defaults give a working single-machine setup (SQLite, filesystem broker, artifacts on
local disk under var/). Production sets DATABASE_URL, CELERY_BROKER_URL, S3_BUCKET and friends.
"""

import ipaddress
import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name, default=""):
    return os.environ.get(name, default)


def env_bool(name, default=False):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {value!r}")


def env_int(name, default):
    return _env_number(name, default, int, "an integer")


def env_float(name, default):
    return _env_number(name, default, float, "a number")


def _env_number(name, default, parse, what):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return parse(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be {what}, got {value!r}") from None


def env_list(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def env_networks(name):
    """Comma-separated networks (``10.0.0.0/8,fd00::/8``), each checked; empty by default."""
    networks = env_list(name, [])
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ImproperlyConfigured(
                f"{name} must be comma-separated networks such as 10.0.0.0/8, got {network!r}"
            ) from None
    return networks


VAR_DIR = Path(env_str("LATENTRY_VAR_DIR", str(BASE_DIR / "var")))
# Local state (SQLite file, broker folders, artifacts) lives here; a fresh checkout has none.
VAR_DIR.mkdir(parents=True, exist_ok=True)

# Off unless set: `make run` and `make test` set DEBUG=true, a deployment leaves it off.
DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DEBUG is off (DEBUG=true for development; make run "
            "and make test set it)"
        )
    SECRET_KEY = "insecure-development-key-do-not-use-in-production"


def _example_secret_keys():
    """The SECRET_KEY values that deploy/'s examples show: copied as they are, they would let
    anyone who read them sign sessions."""
    example = BASE_DIR / "deploy" / "systemd" / "env.example"
    lines = example.read_text().splitlines() if example.exists() else []
    return {line.partition("=")[2].strip() for line in lines if line.startswith("SECRET_KEY=")}


if SECRET_KEY in _example_secret_keys():
    raise ImproperlyConfigured("SECRET_KEY is the example from deploy/: set a secret of your own")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "adrf",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "registry",
    "training",
    "inference",
    "webhooks",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "registry.middleware.RejectNulMiddleware",
    "registry.middleware.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "registry.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: SQLite under var/ unless DATABASE_URL names another (postgres://...).
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'latentry.sqlite3'}"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE transactions make concurrent writers queue instead of failing with
    # "database is locked" halfway through a transaction.
    DATABASES["default"]["OPTIONS"] = {"transaction_mode": "IMMEDIATE", "timeout": 30}
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # A file, not memory, so that worker processes started by the tests share it (its own
    # name per checkout or concurrent run: LATENTRY_TEST_SQLITE).
    test_sqlite = env_str("LATENTRY_TEST_SQLITE", str(VAR_DIR / "test.sqlite3"))
    DATABASES["default"]["TEST"] = {"NAME": test_sqlite}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "account"
LOGOUT_REDIRECT_URL = "catalog"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
MEDIA_ROOT = VAR_DIR / "media"

# Weights and datasets live in the "artifacts" storage: local disk by default, S3 (or any
# S3-compatible store) when S3_BUCKET is set. Credentials come from the usual AWS_* variables.
S3_BUCKET = env_str("S3_BUCKET")
ARTIFACTS_DIR = Path(env_str("LATENTRY_ARTIFACTS_DIR", str(VAR_DIR / "artifacts")))
# Converted base models (safetensors folders) that workers and the router load from.
BASE_MODELS_DIR = Path(env_str("BASE_MODELS_DIR", str(VAR_DIR / "base_models")))
if S3_BUCKET:
    ARTIFACT_STORAGE = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": S3_BUCKET,
            "endpoint_url": env_str("S3_ENDPOINT_URL") or None,
            "region_name": env_str("S3_REGION", env_str("AWS_DEFAULT_REGION")) or None,
            "querystring_expire": env_int("S3_URL_EXPIRY_SECONDS", 300),
            "file_overwrite": True,
            "default_acl": None,
            "signature_version": "s3v4",
        },
    }
else:
    ARTIFACT_STORAGE = {
        "BACKEND": "registry.storage.AtomicFileSystemStorage",
        "OPTIONS": {"location": ARTIFACTS_DIR, "base_url": None},
    }
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    "artifacts": ARTIFACT_STORAGE,
}

# Uploads: files over 2.5 MB spool to a temporary file; the hashing handler computes the
# sha256 chunk by chunk as the request streams in and stops keeping bytes past the limit.
FILE_UPLOAD_HANDLERS = [
    "registry.uploads.HashingMemoryFileUploadHandler",
    "registry.uploads.HashingTemporaryFileUploadHandler",
]
FILE_UPLOAD_TEMP_DIR = env_str("FILE_UPLOAD_TEMP_DIR") or None
LATENTRY_MAX_ARTIFACT_BYTES = env_int("LATENTRY_MAX_ARTIFACT_BYTES", 600 * 1024 * 1024)
# Bounds on an expert file's JSON: its safetensors header, and the config in its metadata
# (stored in the database with the version).
LATENTRY_MAX_HEADER_BYTES = env_int("LATENTRY_MAX_HEADER_BYTES", 1024 * 1024)
LATENTRY_MAX_CONFIG_BYTES = env_int("LATENTRY_MAX_CONFIG_BYTES", 64 * 1024)
# Run every expert file through its base model on a fixed prompt before publishing it
# (coprocessor/probe.py): values can be finite and still overflow the model. The process that
# takes uploads then loads the base model on CPU once (about 4 bytes per parameter). Off: it
# loads none, and a file that breaks the numbers is caught when it is first served or
# evaluated instead (its version is rejected then).
LATENTRY_PROBE_UPLOADS = env_bool("LATENTRY_PROBE_UPLOADS", True)
# Bounds on JSON that users send: API bodies (413 past the size), JSON form fields such as a
# version's claimed_metrics, and their nesting (400 past the depth; Python's json recurses
# once per level, so a deep body would otherwise be a RecursionError). coprocessor.bounded_json.
LATENTRY_JSON_MAX_BYTES = env_int("LATENTRY_JSON_MAX_BYTES", 1024 * 1024)
LATENTRY_JSON_MAX_DEPTH = env_int("LATENTRY_JSON_MAX_DEPTH", 32)

# Per process by default; share one (CACHE_URL=redis://...) when several processes serve, so
# that rate limits and the catalog cache hold across them. Pages kept for anyone who asks
# (anonymous catalog pages and searches, leaderboard tables) have their own cache, "pages":
# a flood of distinct searches fills that one, never pushing out the rate-limit counters.
CACHE_URL = env_str("CACHE_URL", "")


def cache_config(prefix):
    if CACHE_URL:
        backend = "django.core.cache.backends.redis.RedisCache"
        return {"BACKEND": backend, "LOCATION": CACHE_URL, "KEY_PREFIX": prefix}
    return {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": prefix}


CACHES = {"default": cache_config("default"), "pages": cache_config("pages")}
# Rate limits per user (or client address when signed out), answered with 429 and Retry-After:
# generation (native and OpenAI-compatible), uploads (versions, datasets), starting jobs, and
# the sign-up and log-in forms' POSTs (per address). Empty: no limit.
LATENTRY_THROTTLE_RATES = {
    "generate": env_str("LATENTRY_GENERATE_RATE", "120/min") or None,
    # Signed-out callers, per client address, where LATENTRY_ANONYMOUS_GENERATION allows them.
    "generate_anonymous": env_str("LATENTRY_ANONYMOUS_GENERATE_RATE", "20/min") or None,
    "upload": env_str("LATENTRY_UPLOAD_RATE", "60/hour") or None,
    "job": env_str("LATENTRY_JOB_START_RATE", "30/hour") or None,
    "signup": env_str("LATENTRY_SIGNUP_RATE", "10/hour") or None,
    "login": env_str("LATENTRY_LOGIN_RATE", "10/min") or None,
    # Changes that announce themselves to webhooks: alias moves and test pings.
    "announce": env_str("LATENTRY_ANNOUNCE_RATE", "120/hour") or None,
}
# Generation for callers with no account (no session, no API key): the native and
# OpenAI-compatible APIs and "try it". Off by default: on the public internet it is free compute
# for anyone, and the answer is 401. `make run` turns it on, so "try it" works before sign-up.
LATENTRY_ANONYMOUS_GENERATION = env_bool("LATENTRY_ANONYMOUS_GENERATION", False)
# Aliases one expert may have (400 beyond; 0: no limit).
LATENTRY_MAX_ALIASES = env_int("LATENTRY_MAX_ALIASES", 20)
# API keys one user may hold unrevoked (400 beyond; 0: no limit). Limits count per user, so
# more keys buy no more generation, but each key is a row and a secret to look after.
LATENTRY_MAX_API_KEYS = env_int("LATENTRY_MAX_API_KEYS", 20)
# Bytes one user may keep stored: the files of their experts' versions and their datasets (a
# file counts once per row that names it). Past it, uploads and publishing answer 400. 0: none.
LATENTRY_MAX_STORED_BYTES = env_int("LATENTRY_MAX_STORED_BYTES", 5 * 1024**3)
# Training and evaluation jobs one user may have queued or running at once (429 beyond; 0: no
# limit), on every way in (TrainingJob.start, EvaluationJob.start). The jobs the platform
# queues itself (an evaluation after training) are not refused.
LATENTRY_MAX_ACTIVE_JOBS = env_int("LATENTRY_MAX_ACTIVE_JOBS", 3)
# The platform's benchmark measurements of one owner's versions queued or running at once
# (more wait for one of them to end; 0: no limit), and how often one that failed or was
# cancelled is tried again before its version shows "not measured" with the reason.
LATENTRY_MAX_QUEUED_MEASUREMENTS = env_int("LATENTRY_MAX_QUEUED_MEASUREMENTS", 5)
LATENTRY_BENCHMARK_RETRIES = env_int("LATENTRY_BENCHMARK_RETRIES", 2)
# Anonymous catalog pages (no search) are served from that cache for this long: browsing is most
# of the traffic, and building a page costs ten times what serving the cached one does. 0: off.
LATENTRY_CATALOG_CACHE_SECONDS = env_int("LATENTRY_CATALOG_CACHE_SECONDS", 10)

# The router (inference/). Each serving process loads a base model once and keeps experts in
# an LRU cache bounded by bytes. One engine per base model batches at every decode step
# (coprocessor/engine.py): up to LATENTRY_ENGINE_MAX_ROWS rows within a kv-cache budget of
# LATENTRY_ENGINE_CACHE_COLUMNS (what the caches really hold: per batch rows x padded width,
# summed over batches; 46 KB each for SmolLM2-135M in fp32); beyond them up to
# LATENTRY_ENGINE_MAX_WAITING requests wait, each at most LATENTRY_ENGINE_QUEUE_TIMEOUT_S, and
# a full queue or a passed timeout answers 503. Up to LATENTRY_ENGINE_BATCHES batches run side
# by side (one forward each per step), so a near-context prompt is padded alone, not every
# row to its width. One caller's running rows hold at most LATENTRY_ENGINE_CALLER_COLUMNS
# (their own columns; their next request waits, others pass it; 0: no bound), and a request
# that does not fit may be overtaken by younger ones for LATENTRY_ENGINE_OVERTAKE_S only. A
# prompt longer than LATENTRY_ENGINE_PREFILL_CHUNK tokens is prefilled that many tokens per
# step (0: at once), its slices taking at most LATENTRY_ENGINE_PREFILL_SHARE of the engine's
# time while other rows decode.
LATENTRY_EXPERT_CACHE_BYTES = env_int("LATENTRY_EXPERT_CACHE_BYTES", 2 * 1024**3)
LATENTRY_EXPERT_LOAD_TIMEOUT_S = env_float("LATENTRY_EXPERT_LOAD_TIMEOUT_S", 10.0)
LATENTRY_MAX_NEW_TOKENS = env_int("LATENTRY_MAX_NEW_TOKENS", 512)
LATENTRY_ENGINE_MAX_ROWS = env_int("LATENTRY_ENGINE_MAX_ROWS", 32)
LATENTRY_ENGINE_CACHE_COLUMNS = env_int("LATENTRY_ENGINE_CACHE_COLUMNS", 65536)
LATENTRY_ENGINE_MAX_WAITING = env_int("LATENTRY_ENGINE_MAX_WAITING", 256)
LATENTRY_ENGINE_QUEUE_TIMEOUT_S = env_float("LATENTRY_ENGINE_QUEUE_TIMEOUT_S", 30.0)
LATENTRY_ENGINE_PREFILL_TOKENS = env_int("LATENTRY_ENGINE_PREFILL_TOKENS", 4096)
LATENTRY_ENGINE_BATCHES = env_int("LATENTRY_ENGINE_BATCHES", 2)
LATENTRY_ENGINE_CALLER_COLUMNS = env_int("LATENTRY_ENGINE_CALLER_COLUMNS", 16384)
LATENTRY_ENGINE_OVERTAKE_S = env_float("LATENTRY_ENGINE_OVERTAKE_S", 5.0)
LATENTRY_ENGINE_PREFILL_CHUNK = env_int("LATENTRY_ENGINE_PREFILL_CHUNK", 256)
LATENTRY_ENGINE_PREFILL_SHARE = env_float("LATENTRY_ENGINE_PREFILL_SHARE", 0.25)
# The threads that open router requests share for their synchronous work (authentication, the
# database): they, not the number of open streams, bound a serving process's threads and
# database connections (inference/asgi.py).
LATENTRY_ROUTER_SYNC_THREADS = env_int("LATENTRY_ROUTER_SYNC_THREADS", 8)
# The largest request body the router paths take (413 beyond; deploy/nginx.conf agrees).
LATENTRY_ROUTER_MAX_BODY_BYTES = env_int("LATENTRY_ROUTER_MAX_BODY_BYTES", 1024 * 1024)
# A generation that runs longer than this ends with finish_reason "length" (0: no limit).
LATENTRY_REQUEST_TIMEOUT_S = env_float("LATENTRY_REQUEST_TIMEOUT_S", 300.0)
# Empty: this process serves the router itself (make run). A URL: this is a web process that
# loads no model, and "try it" asks the serving process there (README, "Production").
LATENTRY_SERVING_URL = env_str("LATENTRY_SERVING_URL", "")
# Fair use per caller (a user, across all their API keys, else a client address), 429 beyond
# (0: no limit).
LATENTRY_CALLER_CONCURRENCY = env_int("LATENTRY_CALLER_CONCURRENCY", 4)
LATENTRY_CALLER_TOKENS_PER_MIN = env_int("LATENTRY_CALLER_TOKENS_PER_MIN", 40000)
# auto: the least cosine between prompt and profile (from the base model's centre over plain
# text) that picks an expert. 0.55: 94% of in-domain prompts routed right, none of 20 everyday
# questions routed (bench/router.py on SmolLM2, whose table it was read from; docs/method.md).
LATENTRY_AUTO_THRESHOLD = env_float("LATENTRY_AUTO_THRESHOLD", 0.55)
LATENTRY_PROFILE_REFRESH_S = env_float("LATENTRY_PROFILE_REFRESH_S", 30.0)
# Composition (model "<base>:a/x+b/y", a list in /api/v1/generate and /attach): at most this
# many experts on one request; their prefixes add up in its cache columns.
LATENTRY_COMPOSE_MAX = env_int("LATENTRY_COMPOSE_MAX", 4)
# auto may attach two experts when each half of the prompt best matches a different static
# prefix above LATENTRY_AUTO_THRESHOLD. Off: it did so for 10% of long one-domain prompts too
# (bench/router.py; docs/method.md, "Composition"); on where prompts often mix domains.
LATENTRY_AUTO_COMPOSE = env_bool("LATENTRY_AUTO_COMPOSE", False)
# Load the base models into each serving process when it starts, not on the first request.
LATENTRY_WARMUP = env_bool("LATENTRY_WARMUP", False)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "registry.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["registry.permissions.ApiKeyScope"],
    "DEFAULT_PAGINATION_CLASS": "registry.api.Pagination",
    # JSON within LATENTRY_JSON_MAX_BYTES and _DEPTH; forms and multipart as DRF reads them.
    "DEFAULT_PARSER_CLASSES": [
        "registry.parsers.BoundedJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "PAGE_SIZE": 20,
    # No filtering or ordering parameters unless a view names its backends (the catalog does).
    "DEFAULT_FILTER_BACKENDS": [],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "registry.api.exception_handler",
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    # Proxies in front that set X-Forwarded-For (deploy/nginx.conf: 1). 0 reads the client's
    # address from the connection, so a client cannot name its own address to dodge limits.
    "NUM_PROXIES": env_int("NUM_PROXIES", 0),
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Latentry API",
    "DESCRIPTION": "Registry of coprocessor experts that augment a frozen base model's kv-cache.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI assets ship with the package: the docs page works with no network.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "registry.schema.add_error_responses",
    ],
    "ENUM_NAME_OVERRIDES": {
        "JobStatusEnum": "training.models.Job.STATUS_CHOICES",
        "VersionStatusEnum": "registry.models.ExpertVersion.STATUS_CHOICES",
    },
}

# Celery: the filesystem broker needs no server; production points CELERY_BROKER_URL at
# Redis or RabbitMQ. Job state lives in database rows, so results are ignored.
CELERY_BROKER_DIR = VAR_DIR / "broker"
# "localhost": the folder broker has no host, but kombu warns at every start without one.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://localhost/")
if CELERY_BROKER_URL.startswith("filesystem://"):
    for folder in ("queue", "processed", "control"):
        (CELERY_BROKER_DIR / folder).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(CELERY_BROKER_DIR / "queue"),
        "data_folder_out": str(CELERY_BROKER_DIR / "queue"),
        "processed_folder": str(CELERY_BROKER_DIR / "processed"),
        # Exchange tables; kombu's default is "control" in the working directory.
        "control_folder": str(CELERY_BROKER_DIR / "control"),
        "store_processed": False,
        # Workers poll the folder; the default (1 s) would add up to a second per job.
        "polling_interval": 0.1,
    }
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Jobs. Training and evaluation run on queue LATENTRY_JOB_QUEUE ("gpu": one worker per GPU,
# CPU workers where there is none). A worker writes progress and a heartbeat every
# LATENTRY_PROGRESS_SECONDS; a running job whose heartbeat is older than the lease is taken
# over by the next worker that starts or receives it.
LATENTRY_JOB_QUEUE = env_str("LATENTRY_JOB_QUEUE", "gpu")
# Short housekeeping tasks (the storage sweep, token counts of large datasets), on their own
# queue so that they do not wait behind hours of training: a small CPU worker, or every worker
# between jobs (make run's worker reads both queues).
LATENTRY_MAINTENANCE_QUEUE = env_str("LATENTRY_MAINTENANCE_QUEUE", "maintenance")
LATENTRY_PROGRESS_SECONDS = env_float("LATENTRY_PROGRESS_SECONDS", 2.0)
LATENTRY_JOB_LEASE_SECONDS = env_int("LATENTRY_JOB_LEASE_SECONDS", 120)
LATENTRY_JOB_TIME_LIMIT = env_int("LATENTRY_JOB_TIME_LIMIT", 12 * 3600)
# A training job's time budget when it names none, and the most it may name (within the time
# limit less 5 minutes for publishing).
LATENTRY_JOB_TIME_BUDGET_S = env_int("LATENTRY_JOB_TIME_BUDGET_S", 3600)
LATENTRY_JOB_MAX_TIME_BUDGET_S = env_int("LATENTRY_JOB_MAX_TIME_BUDGET_S", 6 * 3600)
# A training job keeps the best checkpoint whose perplexity on a page of plain English (the
# reference text, coprocessor/data/reference.txt) is at most this many percent above the base
# model's; when none stays within it, the job publishes the least harmful one and says so.
LATENTRY_HARM_BOUND_PCT = env_float("LATENTRY_HARM_BOUND_PCT", 1.0)
# (windows_per_step + replay_windows) x positions_per_window x window of one training step:
# what its activations grow with. 4x the default's 16,384.
LATENTRY_MAX_STEP_TOKENS = env_int("LATENTRY_MAX_STEP_TOKENS", 65_536)
LATENTRY_JOB_MAX_ATTEMPTS = env_int("LATENTRY_JOB_MAX_ATTEMPTS", 5)
# The queue is fair across users (training.models.fair_order): a worker sends a job whose
# creator has had more turns than another waiting user back to the queue, for this long at most
# (in case the other job's message was lost).
LATENTRY_JOB_MAX_YIELD_S = env_int("LATENTRY_JOB_MAX_YIELD_S", 600)
LATENTRY_JOB_STORAGE_RETRIES = env_int("LATENTRY_JOB_STORAGE_RETRIES", 3)
LATENTRY_JOB_RETRY_DELAY = env_int("LATENTRY_JOB_RETRY_DELAY", 10)
LATENTRY_MAX_DATASET_BYTES = env_int("LATENTRY_MAX_DATASET_BYTES", 100 * 1024 * 1024)
# Datasets up to this size get their token count in the upload's request; larger ones from a
# worker (training.count_dataset_tokens), token_count null meanwhile.
LATENTRY_INLINE_TOKENIZE_BYTES = env_int("LATENTRY_INLINE_TOKENIZE_BYTES", 1024 * 1024)
# Job worker processes lower their CPU priority by this much (nice), so that serving on the
# same machine keeps its speed while a job trains; 0 leaves it.
LATENTRY_WORKER_NICE = env_int("LATENTRY_WORKER_NICE", 15)
# "cpu", "cuda" or "" (cuda when available).
LATENTRY_DEVICE = env_str("LATENTRY_DEVICE", "")
# The dtype a serving process runs base models in: float32, bfloat16, float16, or "" (bfloat16
# on CUDA, float32 on CPU). Training and evaluation jobs run in float32.
LATENTRY_DTYPE = env_str("LATENTRY_DTYPE", "")
if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # Redis delivers an unacknowledged message again after this, and jobs are acknowledged when
    # they end: longer than the longest job, so a long job is not delivered a second time.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": LATENTRY_JOB_TIME_LIMIT + 600}
# celery beat (`make run` embeds it in its worker; production runs one `beat` process): re-send
# the jobs of workers that died, once per lease. It goes to the job queue, the one workers read.
# And sweep storage of objects no row names (registry.references), every
# LATENTRY_SWEEP_SECONDS, sparing objects younger than LATENTRY_SWEEP_GRACE_S.
LATENTRY_SWEEP_SECONDS = env_int("LATENTRY_SWEEP_SECONDS", 3600)
LATENTRY_SWEEP_GRACE_S = env_int("LATENTRY_SWEEP_GRACE_S", 3600)
CELERY_BEAT_SCHEDULE = {
    "recover-lapsed-jobs": {
        "task": "training.recover_lapsed_jobs",
        "schedule": float(LATENTRY_JOB_LEASE_SECONDS),
        "options": {"queue": LATENTRY_JOB_QUEUE, "expires": float(LATENTRY_JOB_LEASE_SECONDS)},
    },
    "sweep-storage": {
        "task": "registry.sweep_storage",
        "schedule": float(LATENTRY_SWEEP_SECONDS),
        "options": {
            "queue": LATENTRY_MAINTENANCE_QUEUE,
            "expires": float(LATENTRY_SWEEP_SECONDS),
        },
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# Webhooks (webhooks/): each user may register LATENTRY_MAX_WEBHOOKS URLs. Deliveries go only
# to addresses that are globally routable or inside LATENTRY_WEBHOOK_ALLOWED_NETWORKS (empty:
# loopback, private, link-local and other special ranges are refused), checked when the URL is
# resolved for each attempt. An attempt (connecting, sending, every read) ends within
# LATENTRY_WEBHOOK_DEADLINE_S; a failed one is tried again after 2**n x
# LATENTRY_WEBHOOK_RETRY_BASE_S (5 tries in all). The newest LATENTRY_WEBHOOK_KEEP_DELIVERIES
# finished deliveries per hook are kept. Deliveries go to their own queue, LATENTRY_WEBHOOK_QUEUE,
# read by a small worker of its own, so that slow receivers never hold a job worker.
LATENTRY_MAX_WEBHOOKS = env_int("LATENTRY_MAX_WEBHOOKS", 10)
LATENTRY_WEBHOOK_ALLOWED_NETWORKS = env_networks("LATENTRY_WEBHOOK_ALLOWED_NETWORKS")
LATENTRY_WEBHOOK_QUEUE = env_str("LATENTRY_WEBHOOK_QUEUE", "webhooks")
CELERY_TASK_ROUTES = {"webhooks.deliver": {"queue": LATENTRY_WEBHOOK_QUEUE}}
LATENTRY_WEBHOOK_DEADLINE_S = env_float("LATENTRY_WEBHOOK_DEADLINE_S", 5.0)
LATENTRY_WEBHOOK_RETRY_BASE_S = env_float("LATENTRY_WEBHOOK_RETRY_BASE_S", 30.0)
LATENTRY_WEBHOOK_KEEP_DELIVERIES = env_int("LATENTRY_WEBHOOK_KEEP_DELIVERIES", 100)
# Deliveries one user may have waiting across all their hooks; past it new events are recorded
# as failed, unsent (0: no limit).
LATENTRY_WEBHOOK_MAX_PENDING = env_int("LATENTRY_WEBHOOK_MAX_PENDING", 100)
# Failed attempts in a row (five deliveries' worth) that switch a hook off until its owner
# switches it back on (0: never).
LATENTRY_WEBHOOK_MAX_FAILURES = env_int("LATENTRY_WEBHOOK_MAX_FAILURES", 25)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # Django's defaults give "django" a console handler of its own (with DEBUG on) that also
    # propagates here: every 4xx and 5xx was written twice. One handler, the root's.
    "loggers": {"django": {"handlers": [], "propagate": True}},
}

if not DEBUG:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", True)
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
