"""Real Celery worker processes for tests, and a TCP proxy that can cut a service off.

Workers run ``celery -A config worker`` against the test database (a file for SQLite, the test
database for PostgreSQL), the broker of the environment (Redis in CI, the filesystem broker
here) on a queue of their own, and the test's artifact folder or S3 endpoint.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from django.db import connection

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
