"""The README's shell and Python blocks, run in order as a new user would copy them, against a
server on the embedded defaults (SQLite, the filesystem broker and local files, in a folder of
this test's own; the real base model).

What a test cannot run is named, never silently dropped: ``SKIPPED`` lines, and ``SHORTENED``
commands that run with fewer steps. The server stands in for ``make run`` without its workers
(``make migrate``, ``seed_demo``, then uvicorn as ``make run`` starts it); the demo job's
expert, demo/python-docs, is stood in for by an untrained one with the routing profile of the
same text. ``expert.safetensors``, ``corpus.txt`` and ``heldout.txt`` are the files a user
brings.
"""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests
from django.conf import settings

from tests.factories import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SKIPPED = {
    "make run": "it is what this test's server stands in for",
    "make test": "it runs this test",
}
# 15 minutes of training, shortened to one unwatched step
SHORTENED = {"--time-budget-s 900": "--time-budget-s 900 --steps 1 --evaluations 0"}
# Every curl fails on an HTTP error, as a user reading its answer would notice one.
CURL = ("curl ", "curl --fail-with-body -sS ")
BLOCK = re.compile(r"^```(sh|python)\n(.*?)^```", re.S | re.M)


def readme_blocks():
    """(language, code) of each fenced sh or python block, in order."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(README.read_text())]


def on_port(code, port):
    """``code`` talking to this test's server instead of make run's port."""
    return code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")


def runnable(code, port):
    """A shell block as this test runs it: skipped lines out, shortened commands, its port."""
    lines = [line for line in code.splitlines() if not any(line.startswith(s) for s in SKIPPED)]
    code = on_port("\n".join(lines), port)
    for long, short in SHORTENED.items():
        code = code.replace(long, short)
    return code.replace(*CURL)


# What the demo job leaves behind, in a few seconds: demo/python-docs, version 1, with the
# routing profile of the Python docs (its weights untrained: auto reads the profile only).
# Then the expert file a user brings to the README's first upload (an untrained prefix; the
# README's own training command runs later).
DEMO_EXPERT = """
import hashlib, io
from pathlib import Path
from coprocessor import base_models, corpus, routing
from coprocessor.expert import Coprocessor, CoprocessorConfig
from registry.models import BaseModel, Domain, Expert, ExpertVersion
from django.contrib.auth import get_user_model
base = BaseModel.objects.get(slug=base_models.DEFAULT_SLUG)
model, tokenizer = base_models.load(base.weights_location)
train, _ = corpus.demo_split()
profile = routing.profile(model, corpus.tokenize(tokenizer, train[:200]), max_windows=16)
def prefix(positions, path):
    config = CoprocessorConfig(n_latents=0, prefix_positions=positions, prefix_gate_init=-4.0)
    Coprocessor(model, config).save(path, base.fingerprint, base.slug)
    return Path(path).read_bytes()
data = prefix(16, "demo-job.safetensors")
expert = Expert.objects.create(owner=get_user_model().objects.get(username="demo"),
    name="python-docs", domain=Domain.objects.get(slug="python"), base_model=base)
ExpertVersion.publish(expert, io.BytesIO(data), sha256=hashlib.sha256(data).hexdigest(),
    size=len(data), routing_profile=profile)
prefix(32, "expert.safetensors")
"""


@pytest.fixture
def workdir(tmp_path):
    """A folder that looks like the checkout (its entries linked) but keeps what the README's
    commands write (and the embedded state, under var/) apart from it."""
    work = tmp_path / "checkout"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("var", ".git"):
            (work / entry.name).symlink_to(entry)
    pydoc = __import__("pydoc_data.topics", fromlist=["topics"]).topics
    texts = list(pydoc.values())
    (work / "corpus.txt").write_text("\n\n".join(texts[:40]))
    (work / "heldout.txt").write_text(texts[40])
    return work


@pytest.fixture
def user_env(tmp_path):
    """A new user's shell: none of the test run's settings, the embedded state in the test's
    folder, the base model converted once for every run (settings.BASE_MODELS_DIR)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "LATENTRY_", "PYTEST_"))
        and k not in ("DEBUG", "SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL", "CACHE_URL")
    }
    env["LATENTRY_VAR_DIR"] = str(tmp_path / "var")
    env["BASE_MODELS_DIR"] = str(settings.BASE_MODELS_DIR)
    return env


@pytest.fixture
def server(workdir, user_env):
    """``make run``'s server on a free port, with the base model imported and the demo user."""
    for step in (["make", "-s", "migrate"], ["make", "-s", "manage", "ARGS=seed_demo"]):
        subprocess.run(step, cwd=workdir, env=user_env, check=True, capture_output=True)
    demo_job = [".venv/bin/python", "manage.py", "shell", "-c", DEMO_EXPERT]
    subprocess.run(demo_job, cwd=workdir, env={**user_env, "DEBUG": "true"}, check=True)
    port = free_port()
    env = {**user_env, "DEBUG": "true", "LATENTRY_ANONYMOUS_GENERATION": "true"}
    process = subprocess.Popen(
        [".venv/bin/python", "-m", "uvicorn", "config.asgi:application", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/api/v1/experts/", process)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_up(url, process, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout_s} s")


def run_block(language, code, workdir, env, port):
    """Run one block; returns (its output, the environment after it: a shell block's
    exports carry over to the next blocks, as in one terminal)."""
    if language == "python":
        done = subprocess.run(
            [".venv/bin/python", "-c", on_port(code, port)],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return done, env
    env_file = workdir / ".block-env"
    script = f"set -euo pipefail\n{runnable(code, port)}\nenv -0 > {env_file}\n"
    done = subprocess.run(
        ["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode == 0:
        pairs = env_file.read_text().split("\0")
        env = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    return done, env


def test_the_readme_s_blocks_run_in_order_as_written(workdir, user_env, server):
    env = user_env
    outputs = []
    for language, code in readme_blocks():
        done, env = run_block(language, code, workdir, env, server)
        assert done.returncode == 0, f"{language} block failed:\n{code}\n{done.stdout}{done.stderr}"
        outputs.append(done.stdout)
    assert env.get("KEY"), "the README exports an API key"
    chat = outputs[[lang for lang, _ in readme_blocks()].index("python")]
    answer, routed_to = chat.strip().rsplit("\n", 1)
    assert answer.strip(), "the chat example printed an answer"
    assert routed_to == "smollm2-135m-instruct:demo/python-docs@1", "auto routes the example"
    imported = requests.get(
        f"http://127.0.0.1:{server}/api/v1/experts/demo/pydoc-hub/",
        headers={"Authorization": f"Bearer {env['KEY']}"},
        timeout=30,
    )
    assert imported.status_code == 200, imported.text
    assert (workdir / "pydoc-expert" / "README.md").exists()  # the command line's export


def test_every_skipped_line_is_still_in_the_readme():
    """A name in SKIPPED or SHORTENED that the README no longer has is a stale excuse."""
    text = README.read_text()
    assert all(command in text for command in [*SKIPPED, *SHORTENED])
