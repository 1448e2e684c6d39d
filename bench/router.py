"""The router on the real base model (SmolLM2-135M-Instruct): overhead, switching, cold loads,
mixed batches and automatic routing, all through inference.service (choice, expert cache,
engine, generation) as a request would go, warm unless said otherwise.

1. overhead: a 256-token prompt and 32 greedy new tokens with an expert (default N_L, LoRA r=16)
   vs plain; median of ``--repeats`` alternating runs. ``overhead_ratio`` = augmented / plain.
2. switching: 50 distinct experts asked in turn, all in the cache, vs one expert asked 50
   times (64-token prompts, 8 new tokens), in alternating blocks of 5 requests.
   ``switch_ratio`` = distinct / repeated.
   ``cold_load_ms``: one expert read from storage, checked and built, cache empty.
3. mixed batches: 16 concurrent requests each for a different expert vs 16 plain ones, both
   decoded in shared batches (64-token prompts, 32 new tokens).
   ``mixed_throughput_ratio`` = requests/s mixed / requests/s plain.
4. auto routing: one expert per domain (Python docs, software licences, Unix manual pages by
   default; ``--domain name=file.txt`` adds or replaces) with its routing profile from that
   domain's training text. In-domain prompts (held-out windows of 128 tokens and short
   questions, sent as chat messages) should go to their domain's expert: ``auto_accuracy``.
   Questions of no expert's domain should go to none: ``auto_false_route_rate`` is the share
   that got one. ``auto_neighbour_route_rate``: the share of each domain's prompts routed
   somewhere when its own expert is hidden (text of a domain with no expert, next to those
   with one). All at LATENTRY_AUTO_THRESHOLD, with a table over thresholds to calibrate it
   from. The experts' weights are random: what routing reads is the profile, not the weights.
5. auto composing (``LATENTRY_AUTO_COMPOSE`` on, at the same threshold):
   ``auto_compose_single_rate``, the share of one domain's held-out windows that auto composes
   (a second expert of another domain: wrong), and ``auto_compose_mixed_rate``, the share of
   prompts made of a window of each of two domains that it composes of exactly those two.

It uses a scratch database and artifact folder, and the converted base model under
var/base_models (converted on first use).

    .venv/bin/python bench/router.py [--repeats 9] [--threads 2]

Ends with ``RESULT overhead_ratio=... switch_ratio=... cold_load_ms=...
mixed_throughput_ratio=... auto_accuracy=... auto_false_route_rate=...
auto_neighbour_route_rate=... auto_compose_single_rate=... auto_compose_mixed_rate=...``.
Targets: overhead <= 1.15, switch <= 1.05, mixed throughput >= 0.9, auto accuracy >= 0.9, false
routes <= 0.1.
"""

import argparse
import io
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SCRATCH = Path(tempfile.mkdtemp(prefix="latentry-bench-router-"))
os.environ["LATENTRY_VAR_DIR"] = str(SCRATCH)
os.environ.setdefault("BASE_MODELS_DIR", str(ROOT / "var" / "base_models"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DEBUG", "true")  # an in-process development setup
os.environ.pop("DATABASE_URL", None)
os.environ.pop("S3_BUCKET", None)

import django  # noqa: E402

django.setup()

import torch  # noqa: E402
from common import add_smoke_argument, documents, domain_texts, parse, smoke_model  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402

from coprocessor import base_models, corpus, routing  # noqa: E402
from coprocessor.expert import Coprocessor  # noqa: E402
from coprocessor.train import TrainConfig  # noqa: E402
from inference import choose, pool, service  # noqa: E402
from registry import storage  # noqa: E402
from registry.models import BaseModel, Domain, Expert, ExpertVersion  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--experts", type=int, default=50, help="distinct experts for switching")
    p.add_argument("--prompts-per-domain", type=int, default=20)
    p.add_argument("--domain", action="append", default=[], help="name=corpus.txt")
    p.add_argument(
        "--parts", default="overhead,switch,mixed,auto", help="which measurements to take"
    )
    add_smoke_argument(p)
    args = parse(p, smoke=dict(repeats=1, experts=3, prompts_per_domain=2))
    torch.set_num_threads(args.threads)

    call_command("migrate", verbosity=0)
    record = smoke_base_model() if args.smoke else default_base_model()
    user = get_user_model().objects.create_user("bench")
    loaded = pool.pool().base(record)
    train, heldout = corpus.demo_split()
    text = "\n\n".join(heldout)
    maker = ExpertMaker(loaded, record, user)
    print(f"base model {record.slug}; {torch.get_num_threads()} threads; scratch {SCRATCH}")

    parts = set(args.parts.split(","))
    nan = float("nan")
    overhead = measure_overhead(loaded, maker, text, args.repeats) if "overhead" in parts else nan
    switch, cold_ms = (
        measure_switching(loaded, maker, text, args.experts) if "switch" in parts else (nan, nan)
    )
    mixed = measure_mixed(loaded, maker, text, args.repeats) if "mixed" in parts else nan
    accuracy, false_rate, neighbour_rate, compose_single, compose_mixed = (
        measure_auto(loaded, maker, args) if "auto" in parts else (nan,) * 5
    )
    print(
        f"RESULT overhead_ratio={overhead:.3f} switch_ratio={switch:.3f} "
        f"cold_load_ms={cold_ms:.1f} mixed_throughput_ratio={mixed:.3f} "
        f"auto_accuracy={accuracy:.3f} auto_false_route_rate={false_rate:.3f} "
        f"auto_neighbour_route_rate={neighbour_rate:.3f} "
        f"auto_compose_single_rate={compose_single:.3f} "
        f"auto_compose_mixed_rate={compose_mixed:.3f}"
    )
    pool.reset(wait_s=30)  # the engine's thread out of torch before the interpreter ends


def default_base_model():
    call_command("import_base_model", verbosity=0)
    return BaseModel.objects.get(slug=base_models.DEFAULT_SLUG)


def smoke_base_model():
    """The smoke run's base model: the tests' tiny llama, registered as a job would find it."""
    from tests.factories import register_tiny_llama

    model, tokenizer = smoke_model("cpu")
    folder = SCRATCH / "tiny-llama"
    base_models.convert(model, tokenizer, folder)
    context = model.config.max_position_embeddings
    return register_tiny_llama(base_models.describe(model), folder, context_length=context)


class ExpertMaker:
    """Publishes randomly initialised experts of the default shape (what a request pays for
    does not depend on how well the expert was trained)."""

    def __init__(self, loaded, record, user):
        self.loaded, self.record, self.user = loaded, record, user
        self.domain = Domain.objects.create(slug="bench", name="Bench")
        self.count = 0

    def publish(self, name, profile=None, domain=None):
        self.count += 1
        torch.manual_seed(self.count)
        expert = Coprocessor(self.loaded.decoder, TrainConfig().expert)  # what a job trains
        path = SCRATCH / "expert.safetensors"
        expert.save(path, self.record.fingerprint, self.record.slug)
        owner = Expert.objects.create(
            owner=self.user, name=name, domain=domain or self.domain, base_model=self.record
        )
        data = path.read_bytes()
        ExpertVersion.publish(
            owner,
            io.BytesIO(data),
            sha256=storage.sha256_of(io.BytesIO(data)),
            size=len(data),
            routing_profile=profile,
        )
        return f"bench/{name}"


def prompt_of(loaded, text, tokens, offset=0):
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][offset : offset + tokens]
    return loaded.tokenizer.decode(ids)


def timed(ask, user=None):
    started = time.perf_counter()
    answer = service.run(ask, user)
    return time.perf_counter() - started, answer


def measure_overhead(loaded, maker, text, repeats):
    name = maker.publish("overhead")
    prompt = prompt_of(loaded, text, 256)
    plain = service.Ask(base=maker.record.slug, prompt=prompt, max_new_tokens=32)
    augmented = service.Ask(base=maker.record.slug, expert=name, prompt=prompt, max_new_tokens=32)
    timed(plain), timed(augmented)  # warm: the expert is cached, kernels are ready
    plain_s, augmented_s = [], []
    for _ in range(repeats):
        plain_s.append(timed(plain)[0])
        seconds, answer = timed(augmented)
        assert answer.augmented, answer.reason
        augmented_s.append(seconds)
    ratio = statistics.median(augmented_s) / statistics.median(plain_s)
    print(
        f"\noverhead: plain {statistics.median(plain_s) * 1000:.0f} ms, augmented "
        f"{statistics.median(augmented_s) * 1000:.0f} ms (timings {answer.timings_ms})"
    )
    return ratio


def measure_switching(loaded, maker, text, count):
    names = [maker.publish(f"switch-{i}") for i in range(count)]
    prompt = prompt_of(loaded, text, 64, offset=1000)

    def ask(name):
        return service.Ask(base=maker.record.slug, expert=name, prompt=prompt, max_new_tokens=8)

    pool.pool().experts.clear()
    version = ExpertVersion.objects.get(expert__name="switch-0")
    started = time.perf_counter()
    pool.pool().expert(loaded, version)
    cold_ms = (time.perf_counter() - started) * 1000
    for name in names:  # every expert into the cache
        assert timed(ask(name))[1].augmented
    # Short blocks of each, alternating, so that the machine's drift falls on both alike.
    distinct = repeated = 0.0
    for block in range(0, count, 5):
        distinct += sum(timed(ask(name))[0] for name in names[block : block + 5])
        repeated += sum(timed(ask(names[0]))[0] for _ in names[block : block + 5])
    cache = pool.pool().experts
    print(
        f"switching: {count} distinct {distinct * 1000 / count:.1f} ms/request, one repeated "
        f"{repeated * 1000 / count:.1f} ms/request; cache {len(cache.items)} experts, "
        f"{cache.size / 2**20:.0f} MiB; cold load {cold_ms:.0f} ms"
    )
    return distinct / repeated, cold_ms


def measure_mixed(loaded, maker, text, repeats, concurrent=16):
    names = [maker.publish(f"mixed-{i}") for i in range(concurrent)]
    prompts = [prompt_of(loaded, text, 64, offset=64 * i) for i in range(concurrent)]

    def burst(experts):
        asks = [
            service.Ask(base=maker.record.slug, expert=e, prompt=p, max_new_tokens=32)
            for e, p in zip(experts, prompts, strict=True)
        ]
        answers = []
        threads = [
            threading.Thread(target=lambda a=a: answers.append(service.run(a, None))) for a in asks
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        timings = {k: round(v) for k, v in answers[0].timings_ms.items()}
        print(f"  {'mixed' if experts[0] else 'plain'} burst {seconds:.2f} s, batch {timings}")
        return seconds

    burst(names), burst([""] * concurrent)  # warm: experts cached
    admitted = loaded.engine.admitted_sizes
    admitted.clear()
    mixed_s, plain_s = [], []
    for _ in range(repeats):  # alternating, so drifts in machine speed hit both alike
        mixed_s.append(burst(names))
        plain_s.append(burst([""] * concurrent))
    mixed, plain = statistics.median(mixed_s), statistics.median(plain_s)
    pairs = " ".join(f"{p / m:.3f}" for m, p in zip(mixed_s, plain_s, strict=True))
    print(
        f"mixed batches: {concurrent} requests, plain {plain:.2f} s, mixed {mixed:.2f} s; "
        f"plain/mixed per pair {pairs}; requests admitted together {list(admitted)}"
    )
    return plain / mixed


# Short questions a user might type, per domain (the README's own among them), and some of no
# expert's domain: chat prompts are short, unlike held-out windows.
QUESTIONS = {
    "python-docs": [
        "What does zip() do?",
        "How do I sort a list of tuples by the second item?",
        "What is the difference between a list and a tuple in Python?",
        "How do I read a file line by line in Python?",
        "What does the yield keyword do?",
        "How do f-strings format numbers?",
    ],
    "unix-manuals": [
        "How do I list files sorted by size with ls?",
        "What does chmod 755 do?",
        "How do I find files modified in the last day?",
        "Which option makes grep ignore case?",
        "How do I follow a log file with tail?",
        "What does the -r flag of cp do?",
    ],
    "licences": [
        "Can I use GPL code in a proprietary product?",
        "What does the Apache License say about patents?",
        "Do I have to include the copyright notice when I redistribute?",
        "Is the MIT license compatible with the GPL?",
        "What is a derivative work under the GPL?",
        "What warranty does the software come with?",
    ],
}
NO_DOMAIN = [
    "What is the capital of France?",
    "How long should I boil an egg?",
    "Write a short poem about the sea.",
    "What is a good name for a golden retriever?",
    "How many players are on a football team?",
    "What should I pack for a week in the mountains?",
    "Why is the sky blue?",
    "Tell me a joke about cats.",
    "How do I make my houseplants grow faster?",
    "What happened in the French Revolution?",
    "How do I get red wine out of a carpet?",
    "What are the rules of chess castling?",
    "Suggest a vegetarian dinner for four.",
    "How far is the moon from the earth?",
    "What is the best way to learn to swim as an adult?",
    "Who painted the Mona Lisa?",
    "How do I write a thank-you note to a teacher?",
    "What causes thunderstorms?",
    "Give me three tips for a job interview.",
    "How often should I water a cactus?",
]
THRESHOLDS = [round(0.05 * i, 2) for i in range(13)]


def measure_auto(loaded, maker, args):
    """(accuracy, false-route rate, neighbour-route rate) of ``auto`` at
    LATENTRY_AUTO_THRESHOLD, and a table over thresholds to calibrate it from. In-domain:
    held-out windows of 128 tokens and short questions, each to be routed to its domain's
    expert. Off-domain: questions of no expert's domain, to be routed to none. Neighbours:
    each domain's prompts with its own expert hidden (text of a domain nobody published an
    expert for, next to those that have one)."""
    choose.profiles.clear()
    domains = {name: "\n\n".join(texts) for name, texts in domain_texts(documents(args)).items()}
    for item in args.domain:
        name, _, path = item.partition("=")
        domains[name] = Path(path).read_text(errors="replace")
    tokenizer, decoder = loaded.tokenizer, loaded.decoder
    experts, prompts = {}, []  # prompts: (domain, kind, text)
    for name, text in domains.items():
        train, heldout = corpus.split_texts([text], 0.2)
        ids = corpus.tokenize(tokenizer, train)
        profile = routing.profile(decoder, ids, window=256, max_windows=64)
        experts[name] = maker.publish(f"auto-{name}", profile=profile)
        held = corpus.tokenize(tokenizer, heldout)
        step = max(128, (len(held) - 128) // args.prompts_per_domain)
        for start in range(0, len(held) - 128, step)[: args.prompts_per_domain]:
            prompts.append((name, "window", tokenizer.decode(held[start : start + 128])))
        questions = QUESTIONS.get(name, [])[: args.prompts_per_domain]
        prompts += [(name, "question", q) for q in questions]
        print(f"domain {name}: {len(ids)} training tokens, {len(held)} held-out")
    threshold = settings.LATENTRY_AUTO_THRESHOLD
    settings.LATENTRY_AUTO_THRESHOLD = -1.0  # always the best match, with its score
    try:
        own = [(d, kind, *route(maker, text)) for d, kind, text in prompts]
        foreign = [route(maker, q)[1] for q in NO_DOMAIN[: max(2, args.prompts_per_domain)]]
        neighbours = []
        for name, expert in experts.items():
            hide(expert, True)
            neighbours += [route(maker, text)[1] for d, _, text in prompts if d == name]
            hide(expert, False)
    finally:
        settings.LATENTRY_AUTO_THRESHOLD = threshold

    def rates(at, kinds=("window", "question")):
        mine = [(d, chosen, score) for d, kind, chosen, score in own if kind in kinds]
        right = sum(chosen == experts[d] and score >= at for d, chosen, score in mine)
        return (
            right / len(mine),
            sum(score >= at for score in foreign) / len(foreign),
            sum(score >= at for score in neighbours) / len(neighbours),
        )

    print(
        f"auto routing: {len(own)} in-domain prompts, {len(foreign)} of no expert's domain, "
        f"{len(neighbours)} of a domain whose expert is hidden"
    )
    print("  threshold  accuracy  (questions)  false routes  neighbour routes")
    for at in THRESHOLDS:
        accuracy, false_rate, neighbour_rate = rates(at)
        questions = rates(at, ("question",))[0]
        print(
            f"  {at:9.2f}  {accuracy:8.2f}  {questions:11.2f}  {false_rate:12.2f}"
            f"  {neighbour_rate:16.2f}"
        )
    for kind in ("window", "question"):
        scores = [f"{score:.2f}" for d, k, chosen, score in own if k == kind]
        print(f"  in-domain {kind} scores: {' '.join(scores)}")
    print(f"  no-domain scores: {' '.join(f'{score:.2f}' for score in foreign)}")
    print(f"  neighbour scores: {' '.join(f'{score:.2f}' for score in neighbours)}")
    accuracy, false_rate, neighbour_rate = rates(threshold)
    print(
        f"at LATENTRY_AUTO_THRESHOLD {threshold}: accuracy {accuracy:.3f}, false routes "
        f"{false_rate:.3f}, neighbour routes {neighbour_rate:.3f}"
    )
    single, mixed = measure_auto_compose(maker, experts, prompts)
    return accuracy, false_rate, neighbour_rate, single, mixed


def measure_auto_compose(maker, experts, prompts):
    """With LATENTRY_AUTO_COMPOSE on, at LATENTRY_AUTO_THRESHOLD: the share of one domain's
    held-out windows that auto composes (it should not: the second part is another domain's
    expert), and the share of two-domain prompts (a window of each, one after the other) that
    it composes of exactly those two domains' experts."""
    windows = {}
    for domain, kind, text in prompts:
        if kind == "window":
            windows.setdefault(domain, []).append(text)
    pairs = [
        ({experts[a], experts[b]}, f"{x}\n\n{y}")
        for a, b in itertools.combinations(sorted(windows), 2)
        for x, y in zip(windows[a], windows[b], strict=False)
    ]
    settings.LATENTRY_AUTO_COMPOSE = True
    try:
        single = [
            len(route_parts(maker, text)) == 2 for texts in windows.values() for text in texts
        ]
        mixed = [route_parts(maker, text) == both for both, text in pairs]
    finally:
        settings.LATENTRY_AUTO_COMPOSE = False
    single_rate, mixed_rate = sum(single) / len(single), sum(mixed) / len(mixed)
    print(
        f"auto composing: {single_rate:.3f} of {len(single)} one-domain windows composed; "
        f"{mixed_rate:.3f} of {len(mixed)} two-domain prompts composed of their two experts"
    )
    return single_rate, mixed_rate


def auto_answer(maker, text):
    """The answer of ``auto`` for ``text`` as a user's chat message (one token)."""
    ask = service.Ask(
        base=maker.record.slug,
        expert="auto",
        messages=[{"role": "user", "content": text}],
        max_new_tokens=1,
    )
    return service.run(ask, None)


def route_parts(maker, text):
    """The set of experts auto attached to ``text`` (two when it composed)."""
    named = auto_answer(maker, text).expert
    return {part.split("@")[0] for part in named.split("+")} if named else set()


def route(maker, text):
    """(the expert auto chose, its score) for ``text``."""
    answer = auto_answer(maker, text)
    return (answer.expert or "none").split("@")[0], answer.score


def hide(expert, hidden):
    owner, name = expert.split("/")
    visibility = Expert.PRIVATE if hidden else Expert.PUBLIC
    Expert.objects.filter(owner__username=owner, name=name).update(visibility=visibility)


if __name__ == "__main__":
    main()
