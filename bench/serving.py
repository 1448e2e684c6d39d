"""Serving under open-loop load: the engine against today's static batcher and transformers'
own continuous batching, on the real base model (SmolLM2-135M-Instruct).

Requests arrive as a Poisson process at each rate in ``--rates`` for ``--duration`` seconds
(longer at low rates, to expect ``--min-requests``):
prompts of 16-256 tokens from the held-out Python docs and ``max_new_tokens`` of 8-128, drawn
from a seeded distribution, generated to their length (no eos), greedy. Half carry one of 16
experts of the default shape (what a job trains, ``TrainConfig().expert``; random weights,
which cost what trained ones do), half are plain. Arms, on the same arrivals:

  engine        coprocessor.engine.Engine with the serving defaults (the router's engine)
  engine-plain  the same arrivals, every request plain (for mixed_vs_plain_goodput)
  static        the batcher the router had before the engine (StaticBatcher, below)
  transformers  the plain arrivals through transformers' ContinuousBatchingManager
  long-prompt   the engine's arrivals while one more caller sends prompts of nearly the whole
                context back to back (for long_prompt_p95_ratio)

The arms run in this process, each on its own; nothing else runs beside them. A rate is
sustained when the p95 of each request's latency over its latency alone (a linear fit of
prompt and new tokens, measured through the engine with nothing else running) is at most
``--bound`` (4). An arm stops at its first rate not sustained.

    .venv/bin/python bench/serving.py [--rates 0.0625,0.125,0.25,0.5,1,1.5,2] [--duration 45]
        [--min-requests 10]

Ends with ``RESULT sustained_rps_vs_static=<engine/static> p95_latency_vs_static=<engine/static
at static's highest sustained rate> plain_tokens_per_s_vs_transformers=<engine-plain/
transformers, best output tokens/s of each> mixed_vs_plain_goodput=<engine/engine-plain highest
sustained rate> long_prompt_p95_ratio=<the others' p95 latency beside the long prompts / without
them, the worst over the rates both arms ran> errors=<n>``; 503s under overload are counted apart
from errors. Target for the long prompts: at most 1.5.
"""

import collections
import dataclasses
import queue
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from common import corpus_ids, parse, parser, setup

from coprocessor import base_models
from coprocessor.engine import Engine, Overloaded
from coprocessor.expert import Coprocessor
from coprocessor.generate import Request, generate
from coprocessor.train import TrainConfig


@dataclass
class Arrival:
    at: float  # seconds after the start
    prompt: list
    new_tokens: int
    expert: int | None  # index into the experts, or None


@dataclass
class Outcome:
    arrival: Arrival
    first_token_s: float | None = None
    latency_s: float | None = None
    tokens: int = 0
    refused: bool = False  # 503: no room
    error: str = ""


@dataclass
class RateReport:
    rate: float
    outcomes: list = field(repr=False)
    wall_s: float = 0.0

    def done(self):
        return [o for o in self.outcomes if o.latency_s is not None and not o.error]

    def row(self, alone):
        done = self.done()
        slowdown = [o.latency_s / alone(o.arrival) for o in done]
        return {
            "rate": self.rate,
            "rps": len(done) / self.wall_s,
            "tok_s": sum(o.tokens for o in done) / self.wall_s,
            "ttft_p50": quantile([o.first_token_s for o in done], 0.5),
            "ttft_p95": quantile([o.first_token_s for o in done], 0.95),
            "lat_p50": quantile([o.latency_s for o in done], 0.5),
            "lat_p95": quantile([o.latency_s for o in done], 0.95),
            "slowdown_p95": quantile(slowdown, 0.95),
            "refused": sum(o.refused for o in self.outcomes),
            "errors": sum(bool(o.error) for o in self.outcomes),
            "unfinished": sum(o.latency_s is None and not o.refused for o in self.outcomes),
        }


def quantile(values, q):
    values = sorted(v for v in values if v is not None)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def main():
    p = parser(__doc__)
    p.add_argument("--rates", default="0.0625,0.125,0.25,0.5,1,1.5,2", help="arrivals per second")
    p.add_argument("--duration", type=float, default=45.0, help="seconds of arrivals per rate")
    p.add_argument(
        "--min-requests", type=int, default=10, help="low rates run longer to get this many"
    )
    p.add_argument("--bound", type=float, default=4.0, help="sustained: p95 slowdown at most")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--arms", default="engine,engine-plain,static,transformers,long-prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--transformers-blocks",
        type=int,
        help="paged-cache blocks of the transformers arm (default: its own sizing, which takes "
        "most of free memory and ~20 s on a CPU)",
    )
    # One rate, every arm (the RESULT compares them), a few requests each.
    args = parse(
        p, smoke=dict(rates="4", duration=0.5, min_requests=2, experts=2, transformers_blocks=16)
    )
    model, tokenizer = setup(args)
    model.to(base_models.serving_dtype(args.device))
    _, heldout = corpus_ids(args, tokenizer)
    heldout = heldout.tolist()
    experts = [make_expert(model, seed) for seed in range(args.experts)]
    alone = calibrate(model, heldout, experts, SMOKE_CALIBRATION if args.smoke else CALIBRATION)
    rates = [float(r) for r in args.rates.split(",")]
    reports = {}
    for arm in args.arms.split(","):
        reports[arm] = []
        for rate in rates:
            duration = max(args.duration, args.min_requests / rate)
            arrivals = workload(rate, duration, heldout, len(experts), args.seed)
            if arm in ("engine-plain", "transformers"):
                arrivals = [Arrival(a.at, a.prompt, a.new_tokens, None) for a in arrivals]
            report = ARMS[arm](model, experts, arrivals, rate, args)
            row = report.row(alone)
            reports[arm].append(row)
            print_row(arm, row, flush=True)
            if not sustained(row, args.bound):
                break
    print_tables(reports, args.bound)
    print("RESULT " + " ".join(result_fields(reports, args.bound)))


def make_expert(model, seed):
    torch.manual_seed(seed)
    config = dataclasses.replace(TrainConfig().expert, seed=seed)  # what a job trains
    expert = Coprocessor(model, config).eval()
    with torch.no_grad():  # visible, like a trained expert's
        if expert.prefix is not None:
            expert.prefix.gate.fill_(0.0)
        if expert.has_coprocessor:
            expert.latent_head.gate.fill_(0.0)
    return expert.to(next(model.parameters()).device)


def workload(rate, duration, heldout, n_experts, seed):
    """Poisson arrivals with seeded prompts, lengths and experts (the same for every arm)."""
    rng = random.Random(f"{seed}-{rate}")
    arrivals, at = [], rng.expovariate(rate)
    while at < duration:
        length = rng.randint(16, 256)
        start = rng.randrange(0, len(heldout) - length)
        expert = rng.randrange(n_experts) if rng.random() < 0.5 else None
        arrivals.append(Arrival(at, heldout[start : start + length], rng.randint(8, 128), expert))
        at += rng.expovariate(rate)
    return arrivals


CALIBRATION = [(16, 8), (256, 8), (16, 64), (256, 64), (128, 32)]  # (prompt, new tokens)
SMOKE_CALIBRATION = [(8, 2), (32, 2), (8, 8)]


def calibrate(model, heldout, experts, shapes=CALIBRATION):
    """Latency of a request alone: least squares of a + b * prompt + c * new tokens over a few
    requests served one at a time."""
    rows, times = [], []
    for prompt_len, new in shapes:
        for expert in (None, experts[0]):
            request = Request(heldout[:prompt_len], expert, new)
            started = time.perf_counter()
            generate(model, [request])
            times.append(time.perf_counter() - started)
            rows.append([1.0, prompt_len, new])
    coef = torch.linalg.lstsq(torch.tensor(rows), torch.tensor(times)[:, None]).solution[:, 0]
    a, b, c = coef.tolist()
    print(
        f"alone: {a * 1000:.0f} ms + {b * 1000:.2f} ms/prompt token + {c * 1000:.1f} ms/new token"
    )
    return lambda arrival: max(1e-3, a + b * len(arrival.prompt) + c * arrival.new_tokens)


def open_loop(arrivals, submit):
    """Call ``submit(arrival, outcome, started)`` at each arrival's time; wait for all."""
    outcomes = [Outcome(a) for a in arrivals]
    finished = threading.Semaphore(0)
    started = time.perf_counter()
    for arrival, outcome in zip(arrivals, outcomes, strict=True):
        delay = started + arrival.at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submit(arrival, outcome, started, finished)
    for _ in outcomes:
        finished.acquire(timeout=600)
    return outcomes, time.perf_counter() - started


def stamp_first(outcome, started):
    def on_token(token):
        outcome.tokens += 1
        if outcome.first_token_s is None:
            outcome.first_token_s = time.perf_counter() - started - outcome.arrival.at
        return False

    return on_token


def finisher(outcome, started, finished):
    def done(future):
        try:
            future.result()
            outcome.latency_s = time.perf_counter() - started - outcome.arrival.at
        except Overloaded:
            outcome.refused = True
        except Exception as exc:  # counted, not raised: the run goes on
            outcome.error = repr(exc)
        finished.release()

    return done


def run_engine(model, experts, arrivals, rate, args, beside=None):
    """The arrivals through the router's engine; ``beside(engine, stop)``, if given, runs in a
    thread of its own meanwhile (another caller's load) until ``stop`` is set."""
    engine = Engine(model, eos_token_id=None)
    stop = threading.Event()
    if beside:
        other = threading.Thread(target=beside, args=(engine, stop))
        other.start()

    def submit(arrival, outcome, started, finished):
        expert = experts[arrival.expert] if arrival.expert is not None else None
        request = Request(arrival.prompt, expert, arrival.new_tokens)
        request.on_token = stamp_first(outcome, started)
        try:
            ticket = engine.submit(request)
        except Overloaded:
            outcome.refused = True
            finished.release()
            return
        ticket.future.add_done_callback(finisher(outcome, started, finished))

    outcomes, wall = open_loop(arrivals, submit)
    if beside:
        stop.set()
        other.join()
    engine.stop(wait_s=60)
    for o in outcomes:  # a row the engine ended with an error is an error
        if o.latency_s is not None and o.tokens < o.arrival.new_tokens:
            o.error = o.error or "ended early"
    return RateReport(rate, outcomes, wall)


LONG_NEW_TOKENS = 16


def run_long_prompt(model, experts, arrivals, rate, args):
    """The engine arm's arrivals while one more caller sends prompts of nearly the whole
    context back to back (each with ``LONG_NEW_TOKENS`` new tokens), as an anonymous caller
    may: what the others' latency pays for them."""
    context = model.config.max_position_embeddings
    text = [token for arrival in arrivals for token in arrival.prompt] or [0]
    prompt = (text * (context // len(text) + 1))[: context - LONG_NEW_TOKENS]
    sent = []

    def long_caller(engine, stop):
        while not stop.is_set():
            request = Request(prompt, None, LONG_NEW_TOKENS, caller="long-prompts")
            try:
                engine.submit(request).future.result()
                sent.append(len(prompt))
            except Overloaded:  # no room now: try again, as a client would
                time.sleep(0.05)

    report = run_engine(model, experts, arrivals, rate, args, beside=long_caller)
    print(f"  beside them: {len(sent)} prompts of {len(prompt)} tokens answered", flush=True)
    return report


def run_static(model, experts, arrivals, rate, args):
    batcher = StaticBatcher(model, None, max_batch=16, wait_s=0.005, max_wait_s=0.05)

    def submit(arrival, outcome, started, finished):
        expert = experts[arrival.expert] if arrival.expert is not None else None
        request = Request(arrival.prompt, expert, arrival.new_tokens)
        request.on_token = stamp_first(outcome, started)
        batcher.submit(request).add_done_callback(finisher(outcome, started, finished))

    outcomes, wall = open_loop(arrivals, submit)
    batcher.stop()
    return RateReport(rate, outcomes, wall)


def run_transformers(model, experts, arrivals, rate, args):
    """transformers' continuous batching (paged cache, its own scheduler), plain requests."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=128, eos_token_id=-1)
    cache = ContinuousBatchingConfig(num_blocks=args.transformers_blocks)
    manager = model.init_continuous_batching(
        generation_config=config, continuous_batching_config=cache
    )
    manager.start()
    waiting = {}
    lock = threading.Lock()

    def collect():
        while manager.is_running() or waiting:
            result = manager.get_result(timeout=0.1)
            if result is None:
                continue
            with lock:
                entry = waiting.get(result.request_id)
            if entry is None:
                continue
            outcome, started, finished = entry
            now = time.perf_counter() - started - outcome.arrival.at
            if outcome.first_token_s is None:
                outcome.first_token_s = now
            if result.is_finished():
                outcome.tokens = len(result.generated_tokens)
                outcome.latency_s = now
                with lock:
                    waiting.pop(result.request_id)
                finished.release()

    # Warm: the first request pays for setting up the paged cache, not part of serving.
    manager.add_request([1, 2, 3], "warm-up", max_new_tokens=2)
    while (result := manager.get_result(timeout=60)) is not None and not result.is_finished():
        pass
    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    counter = iter(range(1_000_000))

    def submit(arrival, outcome, started, finished):
        request_id = f"r{next(counter)}"
        with lock:
            waiting[request_id] = (outcome, started, finished)
        manager.add_request(
            arrival.prompt, request_id, max_new_tokens=arrival.new_tokens, streaming=True
        )

    outcomes, wall = open_loop(arrivals, submit)
    manager.stop(block=True)
    collector.join(60)
    model.destroy_cached_continuous_batching_manager()
    return RateReport(rate, outcomes, wall)


# --- the static baseline ---------------------------------------------------------------------


class StaticBatcher:
    """Shared decode batches: requests that arrive together are generated together.

    One thread per base model runs the decoder. It takes the first waiting request, gathers what
    else keeps arriving (up to ``max_batch``), and generates them as one batch: the LoRA experts'
    latents come from the batch's one prefill (each row with its own expert's deltas), decoding is
    shared, and a request's output does not depend on its batch-mates (coprocessor.generate).
    """

    def __init__(self, decoder, eos_token_id, *, max_batch=16, wait_s=0.005, max_wait_s=0.05):
        self.decoder = decoder
        self.eos_token_id = eos_token_id
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.max_wait_s = max(max_wait_s, wait_s)
        self.waiting = queue.Queue()
        self.thread = None
        self.lock = threading.Lock()
        self.closed = False
        self.batch_sizes = collections.deque(maxlen=1000)  # recent batch sizes, for benches

    def submit(self, request):
        """Queue a coprocessor.generate.Request; the Future gives its Generation."""
        future = Future()
        with self.lock:
            if self.closed:  # its model was replaced: the caller asks the pool again
                raise RuntimeError("this base model was reloaded; send the request again")
            self.waiting.put((request, future))
        self._ensure_running()
        return future

    def _ensure_running(self):
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="decode-batcher", daemon=True)
                self.thread.start()

    def stop(self):
        """Serve what is queued, then end (joined: see Engine.stop); later submits are
        refused."""
        with self.lock:
            self.closed = True
            self.waiting.put(None)
        if self.thread is not None:
            self.thread.join(60)

    def _run(self):
        while True:
            first = self.waiting.get()
            if first is None:
                return
            batch = [first]
            self._gather(batch)
            self.batch_sizes.append(len(batch))
            requests = [request for request, _ in batch]
            try:
                outputs = generate(self.decoder, requests, eos_token_id=self.eos_token_id)
            except Exception as exc:  # every waiting caller learns of it; the thread lives on
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), output in zip(batch, outputs, strict=True):
                future.set_result(output)

    def _gather(self, batch):
        """Take more requests while they keep coming (each arrival waits ``wait_s`` more for
        the next), for at most ``max_wait_s`` in all."""
        started = time.monotonic()
        deadline = started + self.wait_s
        while len(batch) < self.max_batch:
            try:
                item = self.waiting.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                return
            if item is None:
                self.waiting.put(None)
                return
            batch.append(item)
            deadline = min(time.monotonic() + self.wait_s, started + self.max_wait_s)


ARMS = {
    "engine": run_engine,
    "long-prompt": run_long_prompt,
    "engine-plain": run_engine,
    "static": run_static,
    "transformers": run_transformers,
}


def sustained(row, bound):
    return row["slowdown_p95"] <= bound and not row["errors"] and not row["unfinished"]


def highest_sustained(rows, bound):
    return max((r["rate"] for r in rows if sustained(r, bound)), default=0.0)


def print_row(arm, row, flush=False):
    print(
        f"{arm:13} {row['rate']:5.2f}/s: {row['rps']:5.2f} req/s {row['tok_s']:7.1f} tok/s, "
        f"ttft p50/p95 {row['ttft_p50']:6.2f}/{row['ttft_p95']:6.2f} s, latency p50/p95 "
        f"{row['lat_p50']:6.2f}/{row['lat_p95']:6.2f} s, slowdown p95 {row['slowdown_p95']:5.2f}, "
        f"503 {row['refused']}, errors {row['errors']}, unfinished {row['unfinished']}",
        flush=flush,
    )


def print_tables(reports, bound):
    print(f"\nsustained: p95 latency at most {bound:g}x the same request alone")
    for arm, rows in reports.items():
        print(f"\n{arm}: highest sustained {highest_sustained(rows, bound):g} req/s")
        for row in rows:
            print_row(arm, row)


def result_fields(reports, bound):
    def best(arm, key):
        return max((r[key] for r in reports.get(arm, [])), default=float("nan"))

    def rate_of(arm):
        return highest_sustained(reports.get(arm, []), bound)

    static_rate = rate_of("static")
    engine_at = [r for r in reports.get("engine", []) if r["rate"] == static_rate]
    static_at = [r for r in reports.get("static", []) if r["rate"] == static_rate]
    p95_ratio = (
        engine_at[0]["lat_p95"] / static_at[0]["lat_p95"]
        if engine_at and static_at
        else float("nan")
    )
    errors = sum(r["errors"] for rows in reports.values() for r in rows)
    tokens = ratio(best("engine-plain", "tok_s"), best("transformers", "tok_s"))
    # The others' p95 latency beside the long prompts over the same arrivals without them,
    # at every rate both arms ran: the worst.
    without = {r["rate"]: r["lat_p95"] for r in reports.get("engine", [])}
    beside = [
        r["lat_p95"] / without[r["rate"]]
        for r in reports.get("long-prompt", [])
        if without.get(r["rate"])
    ]
    return [
        f"sustained_rps_vs_static={ratio(rate_of('engine'), static_rate):.2f}",
        f"p95_latency_vs_static={p95_ratio:.3f}",
        f"plain_tokens_per_s_vs_transformers={tokens:.2f}",
        f"mixed_vs_plain_goodput={ratio(rate_of('engine'), rate_of('engine-plain')):.2f}",
        f"long_prompt_p95_ratio={max(beside, default=float('nan')):.2f}",
        f"errors={errors}",
    ]


def ratio(a, b):
    return a / b if b else float("nan")


if __name__ == "__main__":
    main()
