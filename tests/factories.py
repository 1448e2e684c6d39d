"""What tests and benches build and run: tiny models, corpora, registry rows, expert files,
datasets, API clients, and real worker processes.

Plain functions only, so a bench can use them as well as a test; fixtures (and the personas:
alice the owner, bob with no access, sam the staff) live in conftest.py.
"""

import contextlib
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import torch
from django.db import connection
from rest_framework.test import APIClient
from safetensors.torch import save

from coprocessor import artifact
from coprocessor.expert import Coprocessor, CoprocessorConfig
from registry import storage
from registry.models import ApiKey, BaseModel
from tests.tiny import (  # noqa: F401 (re-exported: tests import them from here)
    FAMILIES,
    LLAMA_SHAPE,
    VOCAB,
    frozen,
    phrase_corpus,
    phrase_text,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
    word_tokenizer,
)
from training import datasets

# --- experts and registry rows --------------------------------------------------------------


def randomize(expert, seed=1):
    """Give an expert non-trivial weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
        if expert.has_coprocessor:
            expert.latent_head.gate.fill_(0.0)
        if expert.prefix is not None:
            expert.prefix.gate.fill_(0.0)
    return expert


def prefix_expert(model, *, positions=4, n_latents=0, seed=1, **config):
    """A randomized expert with a static prefix (and ``n_latents`` latents, 0: none)."""
    config = CoprocessorConfig(
        n_latents=n_latents, prefix_positions=positions, lora_rank=2, seed=seed, **config
    )
    return randomize(Coprocessor(model, config), seed)


def expert_bytes(decoder, fingerprint, seed, folder, **config):
    """A small expert with a visible effect: open gates, random latents (and prefix, with
    ``prefix_positions``; ``n_latents=0`` for a prefix alone)."""
    torch.manual_seed(seed)
    config = {"n_latents": 2, "lora_rank": 2, "gate_init": 0.0, **config}
    expert = Coprocessor(decoder, CoprocessorConfig(**config))
    with torch.no_grad():
        if expert.has_coprocessor:
            expert.latent_head.proj.weight.normal_(0, 1.0)
            for b in expert.lora_b:
                b.normal_(0, 0.5)
        if expert.prefix is not None:
            expert.prefix.keys.normal_(0, 1.0)
            expert.prefix.values.normal_(0, 1.0)
            expert.prefix.gate.zero_()
    path = folder / f"expert-{seed}.safetensors"
    expert.save(path, fingerprint, "tiny-llama")
    return path.read_bytes()


def expert_file_bytes(
    spec, *, n_latents=4, rank=2, targets=("q_proj", "v_proj"), seed=0, tensors=None, metadata=None
):
    """A valid LoRA expert file for ``spec``; pass tensors/metadata to break it on purpose."""
    generator = torch.Generator().manual_seed(seed)
    made = {"soft_tokens": torch.randn(n_latents, spec.hidden_size, generator=generator)}
    for layer in range(spec.num_layers):
        for target in targets:
            module = f"model.layers.{layer}.self_attn.{target}"
            out_features, in_features = spec.param_shapes[f"{module}.weight"]
            prefix = f"base_model.model.{module}"
            made[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
            made[f"{prefix}.lora_B.weight"] = torch.zeros(out_features, rank)
    made.update(tensors or {})
    meta = artifact.build_metadata(
        kind="lora",
        base_model_fingerprint=spec.fingerprint,
        n_latents=n_latents,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        base_model_id="tiny-llama",
        lora_rank=rank,
        lora_alpha=2 * rank,
        lora_target_modules=list(targets),
        config={"ahead_tokens": 4},
    )
    meta.update(metadata or {})
    return save({k: v.contiguous() for k, v in made.items()}, metadata=meta)


def scaled(data, scale, *names):
    """Expert file bytes with every tensor whose name holds one of ``names`` times ``scale``:
    values float32 holds (1e30 is finite) that may still overflow D's arithmetic."""
    tensors, metadata = artifact.load_expert_bytes(data)
    for name in tensors:
        if any(part in name for part in names):
            tensors[name] = tensors[name] * scale
    return save(tensors, metadata=metadata)


def register_tiny_llama(spec, folder, context_length=LLAMA_SHAPE["max_position_embeddings"]):
    """The registry row of the tiny llama whose weights are saved in ``folder``."""
    return BaseModel.objects.create(
        slug="tiny-llama",
        source="tests/tiny-llama",
        architecture="LlamaForCausalLM",
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        vocab_size=LLAMA_SHAPE["vocab_size"],
        context_length=context_length,
        fingerprint=spec.fingerprint,
        weights_location=str(folder),
        param_shapes=spec.param_shapes,
        kv_heads=spec.kv_heads,
        head_dim=spec.head_dim,
    )


# --- datasets and jobs ----------------------------------------------------------------------


# A training job that the tiny base model runs in a few seconds.
SMALL_JOB = dict(
    steps=30,
    window=64,
    ahead_tokens=4,
    positions_per_window=4,
    checkpoint_every=10,
    n_latents=2,
    lora_rank=2,
    prefix_positions=4,
    evaluations=0,  # every step runs; test_job_watch.py is about stopping early
)


def make_dataset(owner, name="words", text=None, public=False, base_model=None):
    """A text dataset of repeated phrases (``phrase_text``) that the tiny model can learn."""
    data = (text or phrase_text(length=3000)).encode()
    return datasets.create(
        owner,
        name,
        io.BytesIO(data),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        fmt="text",
        public=public,
        base_model=base_model,
    )


# --- API clients and stored objects ---------------------------------------------------------


def client_for(user=None):
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


def logged_in(user):
    """A browser-like client with a session for ``user``: what the pages see."""
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client


def bearer_client(user, scopes=(ApiKey.READ, ApiKey.WRITE)):
    _, plaintext = ApiKey.create_for(user, "test", scopes)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    return client


def upload(client, expert, data, filename="expert.safetensors", **fields):
    return client.post(
        f"/api/v1/experts/{expert.owner.username}/{expert.name}/versions/",
        {"file": io.BytesIO(data) if isinstance(data, bytes) else data, **fields},
        format="multipart",
    )


def stored_keys():
    """Every object key in the current artifact storage."""
    backend = storage.artifacts()
    if not storage.is_s3() and not Path(backend.location).exists():
        return []
    keys = []
    stack = [""]
    while stack:
        prefix = stack.pop()
        dirs, files = backend.listdir(prefix)
        keys += [f"{prefix}{f}" for f in files]
        stack += [f"{prefix}{d}/" for d in dirs]
    return sorted(keys)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- real worker processes ------------------------------------------------------------------


ROOT = Path(__file__).resolve().parent.parent


def database_url():
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{db['NAME']}"


class Worker:
    """One worker node; ``kill()`` is SIGKILL to it and its pool, like a machine dying."""

    def __init__(self, queue, env, name="w1", log_path=None):
        self.log_path = log_path
        self.log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "-Q",
            queue,
            "-n",
            f"{name}@latentry-test",
            "-c",
            "1",
            "-P",
            "prefork",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "info",
        ]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self):
        """End of test: nothing it still runs matters, so no warm shutdown to wait for."""
        self.kill()
        if self.log is not subprocess.DEVNULL:
            self.log.close()

    def output(self):
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def wait_ready(self, timeout=60):
        """Until the worker has started (and run its start-up recovery): it logs "ready."."""
        wait_for(lambda: " ready." in self.output(), timeout=timeout, what="the worker to start")


def worker_env(queue, artifacts_dir, **extra):
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "LATENTRY_JOB_QUEUE": queue,
        "LATENTRY_ARTIFACTS_DIR": str(artifacts_dir),
        "LATENTRY_PROGRESS_SECONDS": "0.2",
        "LATENTRY_JOB_LEASE_SECONDS": "30",
        "LATENTRY_JOB_RETRY_DELAY": "1",
        "LATENTRY_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        "DJANGO_SETTINGS_MODULE": "config.settings",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def new_queue():
    return f"test-{uuid.uuid4().hex[:10]}"


def wait_for(predicate, timeout=60, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class FaultProxy:
    """Forwards TCP to a backend; ``cut()`` makes it refuse new connections and drop open
    ones (the service is unreachable), ``restore()`` brings it back."""

    def __init__(self, backend_port):
        self.backend_port = backend_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.open = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self):
        self.up = False
        for sock in list(self.open):
            _close(sock)

    def restore(self):
        self.up = True

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                _close(client)
                continue
            try:
                backend = socket.create_connection(("127.0.0.1", self.backend_port))
            except OSError:
                _close(client)
                continue
            self.open += [client, backend]
            for a, b in ((client, backend), (backend, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source, target):
        try:
            while self.up and (data := source.recv(65536)):
                target.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            _close(target)

    def close(self):
        self.cut()
        _close(self.listener)


def _close(sock):
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def slow_steps(monkeypatch, seconds):
    """Make every decode step of the engine take ``seconds`` longer: requests stay in flight."""
    from coprocessor.generate import RunningBatch

    step = RunningBatch.step

    def slow_step(batch):
        time.sleep(seconds)
        return step(batch)

    monkeypatch.setattr(RunningBatch, "step", slow_step)
