"""Every bench runs its whole path in its smoke mode and ends with its full RESULT line.

The benches are the evidence behind every figure in the docs; a smoke run (tiny models, a
handful of requests or steps) keeps a change from breaking one unseen. Each runs as a user
would run it, as a script in its own process. Select or skip them by marker:
``pytest -m bench`` or ``pytest -m "not bench"``.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# script, arguments, the keys its RESULT line must carry (what the full run prints).
BENCHES = [
    (
        "api_load.py",
        [],
        [
            "catalog_rps_vs_floor",
            "search_p95_ms",
            "leaderboard_p95_ms",
            "alias_lookup_vs_number",
            "errors",
        ],
    ),
    (
        "compose.py",
        [],
        [
            "compose_keep_a",
            "compose_keep_b",
            "compose_mixed_vs_best_single",
            "compose_naive_keep_min",
            "compose_latency_ratio",
        ],
    ),
    ("jobs.py", [], ["queue_overhead_pct", "cancel_latency_s"]),
    ("load.py", [], ["sustained_rps", "errors", "lost_writes"]),
    (
        "load.py",
        ["--abuse"],
        [
            "legit_errors",
            "legit_p95_ratio",
            "abuser_bytes_stored",
            "abuser_jobs_over_cap",
            "lost_writes",
        ],
    ),
    ("overhead.py", [], ["overhead_ratio", "coprocessor_ms"]),
    (
        "quality.py",
        [],
        [
            "ppl_base",
            "ppl_expert",
            "reduction_pct",
            "lora_finetune_reduction_pct",
            "soft_tokens_reduction_pct",
            "step0_harm_pct",
            "offdomain_harm_pct",
            "lora_offdomain_harm_pct",
            "stopped_at_s",
        ],
    ),
    (
        "router.py",
        [],
        [
            "overhead_ratio",
            "switch_ratio",
            "cold_load_ms",
            "mixed_throughput_ratio",
            "auto_accuracy",
            "auto_false_route_rate",
            "auto_neighbour_route_rate",
            "auto_compose_single_rate",
            "auto_compose_mixed_rate",
        ],
    ),
    (
        "serving.py",
        [],
        [
            "sustained_rps_vs_static",
            "p95_latency_vs_static",
            "plain_tokens_per_s_vs_transformers",
            "mixed_vs_plain_goodput",
            "long_prompt_p95_ratio",
            "errors",
        ],
    ),
    ("train_speed.py", [], ["train_speed_ratio"]),
]

# The service benches measure the production set-up: PostgreSQL and Redis on this machine.
NEEDS_SERVERS = {"api_load.py": ("postgresql", "redis"), "load.py": ("postgresql", "redis")}
SERVERS = {"postgresql": ("127.0.0.1", 5432), "redis": ("127.0.0.1", 6379)}


def reachable(server):
    try:
        socket.create_connection(SERVERS[server], timeout=1).close()
    except OSError:
        return False
    return True


def result_keys(output):
    """The keys of the last RESULT line; fails the test if there is none."""
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line; the output ends:\n{output[-3000:]}"
    return re.findall(r"(\w+)=", lines[-1])


def run_smoke(script, arguments):
    # One thread: tiny models gain nothing from more, and the suite runs two benches at once.
    env = {**os.environ, "DEBUG": "true", "BENCH_SMOKE": "1", "PYTHONUNBUFFERED": "1"}
    env.update(BENCH_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, f"bench/{script}", *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.bench
@pytest.mark.parametrize(
    ("script", "arguments", "keys"),
    BENCHES,
    ids=[" ".join([script, *arguments]) for script, arguments, _ in BENCHES],
)
def test_the_bench_runs_its_whole_path_in_smoke_mode(script, arguments, keys):
    missing = [s for s in NEEDS_SERVERS.get(script, ()) if not reachable(s)]
    if missing:
        pytest.skip(f"{script} measures against {' and '.join(missing)}, not running here")
    finished = run_smoke(script, arguments)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-3000:]
    assert "smoke run" in finished.stdout  # the smoke settings took, not the full run's
    assert result_keys(finished.stdout) == keys


def test_the_result_check_reads_the_last_result_line():
    assert result_keys("RESULT a=1\nnoise\nRESULT b=2 c=nan\n") == ["b", "c"]
    with pytest.raises(AssertionError, match="no RESULT line"):
        result_keys("a=1\n")
