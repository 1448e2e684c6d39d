"""Composition: two experts trained apart, each alone and both on one request.

Trains, for the same budget each: A on --corpus-a (the Python docs) and B on --corpus-b (the
Unix manual pages), once by the default recipe (TrainConfig's, what a job trains) and once
with coexistence training (``--coexist`` of the steps beside a neighbour prefix:
``TrainConfig.coexist``). Then measures held-out perplexity (the same fixed
(window, position) pairs for every arm) on A's held-out text, B's, and text that interleaves
both (chunks of ``--chunk`` tokens taken in turn from each), for: plain D; each expert alone;
the two composed with one shared sink (``coprocessor.compose``, what serving does); and the
default pair concatenated naively (both sinks). Last, the serving cost: the same batch
of prompts generated with the composition and with A alone, alternating.

    python bench/compose.py [--budget-min 15] [--coexist 0.5] [--corpus-a python-docs]
        [--corpus-b unix-manuals]

Ends with ``RESULT compose_keep_a=<composed gain on A's held-out / A alone's>
compose_keep_b=<same for B> compose_mixed_vs_best_single=<composed gain on interleaved text /
the better single expert's> compose_naive_keep_min=<the lower keep of naive concatenation>
compose_latency_ratio=<composed / single, same prompts>``, for the default recipe's pair (the
coexistence-trained pair's figures are printed beside it).
Gains are perplexity reductions against plain D. Targets: keeps >= 0.9, mixed >= 1.1, latency
<= 1.05.
"""

import statistics
import time

import torch
from common import add_expert_arguments, budget_config, corpus_ids, parse, parser, setup

from coprocessor.compose import Composition
from coprocessor.evaluate import evaluate, heldout_set
from coprocessor.generate import Request, generate
from coprocessor.train import TrainConfig, train
from coprocessor.watch import reference_ids


def main():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--budget-min", type=float, default=15.0, help="training minutes per expert")
    p.add_argument("--corpus-a", default="python-docs")
    p.add_argument("--corpus-b", default="unix-manuals")
    p.add_argument("--coexist", type=float, default=0.5, help="share of coexistence steps")
    p.add_argument("--chunk", type=int, default=64, help="tokens per turn in interleaved text")
    p.add_argument("--heldout-windows", type=int, default=21, help="held-out windows per text")
    p.add_argument("--latency-repeats", type=int, default=9)
    p.add_argument("--latency-prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    add_expert_arguments(p)
    args = parse(
        p,
        smoke=dict(
            budget_min=0.25 / 60,
            window=64,
            windows_per_step=2,
            heldout_windows=2,
            evaluations=0,
            latency_repeats=1,
            latency_prompts=2,
            new_tokens=2,
            chunk=16,
        ),
    )
    model, tokenizer = setup(args)
    train_a, heldout_a = corpus_ids(args, tokenizer, args.corpus_a)
    train_b, heldout_b = corpus_ids(args, tokenizer, args.corpus_b)
    texts = {
        "A": make_heldout(heldout_a, args),
        "B": make_heldout(heldout_b, args),
        "mixed": make_heldout(interleave(heldout_a, heldout_b, args.chunk), args),
    }
    base = {name: evaluate(model, None, text)["base"]["ppl"] for name, text in texts.items()}
    print("plain D perplexity: " + ", ".join(f"{n} {ppl:.3f}" for n, ppl in base.items()))

    reference = reference_ids(tokenizer)
    experts = {}
    recipes = (("default", TrainConfig.coexist), ("coexist", args.coexist))
    for recipe, coexist in recipes:
        for name, ids in (("A", train_a), ("B", train_b)):
            experts[recipe, name] = train_expert(model, tokenizer, ids, args, coexist, reference)
            print(f"trained {name} ({recipe})", flush=True)

    gains = {}  # (arm, text) -> perplexity reduction against plain D, %
    arms = {}
    for recipe, _ in recipes:
        a, b = experts[recipe, "A"], experts[recipe, "B"]
        arms[f"A alone ({recipe})"] = a
        arms[f"B alone ({recipe})"] = b
        arms[f"A+B ({recipe})"] = Composition([a, b])
    arms["A+B naive (default)"] = Composition(
        [experts["default", "A"], experts["default", "B"]], shared_sink=False
    )
    for arm, expert in arms.items():
        for name, text in texts.items():
            ppl = evaluate(model, expert, text, include_base=False)["augmented"]["ppl"]
            gains[arm, name] = 100 * (base[name] - ppl) / base[name]
        print(f"  {arm:22} " + " ".join(f"{n} {gains[arm, n]:+7.2f}%" for n in texts), flush=True)
    print_table(gains, texts)

    keeps = {recipe: keep(gains, f"A+B ({recipe})", recipe) for recipe, _ in recipes}
    naive = keep(gains, "A+B naive (default)", "default")
    for label, (keep_a, keep_b) in [*keeps.items(), ("naive, default", naive)]:
        print(f"keep ({label}): A {keep_a:.3f}, B {keep_b:.3f}")
    mixed = {recipe: mixed_ratio(gains, recipe) for recipe, _ in recipes}
    print(
        "composed on interleaved text / the better single: "
        + ", ".join(f"{recipe} {ratio:.3f}" for recipe, ratio in mixed.items())
    )
    ratio = latency_ratio(model, heldout_a, experts, args)
    keep_a, keep_b = keeps["default"]
    print(
        f"RESULT compose_keep_a={keep_a:.3f} compose_keep_b={keep_b:.3f} "
        f"compose_mixed_vs_best_single={mixed['default']:.3f} "
        f"compose_naive_keep_min={min(naive):.3f} compose_latency_ratio={ratio:.3f}"
    )


def mixed_ratio(gains, recipe):
    """The composition's gain on interleaved text over the better single expert's there."""
    best = max(gains[f"{name} alone ({recipe})", "mixed"] for name in ("A", "B"))
    return ratio(gains[f"A+B ({recipe})", "mixed"], best)


def make_heldout(ids, args):
    return heldout_set(ids, window=args.window, ahead=args.ahead, max_windows=args.heldout_windows)


def interleave(a, b, chunk):
    """Chunks of ``chunk`` tokens, from ``a`` and ``b`` in turn, as long as the shorter lasts."""
    pieces = []
    for start in range(0, min(len(a), len(b)) - chunk + 1, chunk):
        pieces += [a[start : start + chunk], b[start : start + chunk]]
    return torch.cat(pieces)


def train_expert(model, tokenizer, ids, args, coexist, reference):
    config = budget_config(args, tokenizer, len(ids), coexist=coexist)
    result = train(model, ids, config, reference_ids=reference)
    print(f"  {result.steps} steps; {result.summary}", flush=True)
    return result.expert


def keep(gains, composed, recipe):
    """The composition's gain on each part's own text over that part's gain alone."""
    return tuple(
        ratio(gains[composed, name], gains[f"{name} alone ({recipe})", name]) for name in ("A", "B")
    )


def ratio(gain, reference):
    """``gain / reference``; nan when the reference gained nothing (an expert whose budget
    ran out before its first step): no ratio says what composing kept of no gain."""
    return gain / reference if reference else float("nan")


def print_table(gains, texts):
    arms = sorted({arm for arm, _ in gains}, key=list({a: 0 for a, _ in gains}).index)
    print("\nperplexity reduction against plain D, % (higher is better)")
    print(f"{'arm':24}" + "".join(f"{name:>10}" for name in texts))
    for arm in arms:
        print(f"{arm:24}" + "".join(f"{gains[arm, name]:10.2f}" for name in texts))


@torch.no_grad()
def latency_ratio(model, ids, experts, args):
    """Seconds to generate the same prompts with A+B composed over A alone, alternating runs
    (median of the per-pair ratios, so a busy machine slows both alike)."""
    a, b = experts["default", "A"], experts["default", "B"]
    composed = Composition([a, b])
    prompts = [ids[i * 64 : i * 64 + 48].tolist() for i in range(args.latency_prompts)]

    def seconds(expert):  # no end-of-text token: every run generates the same count
        started = time.perf_counter()
        generate(model, [Request(p, expert, args.new_tokens) for p in prompts])
        return time.perf_counter() - started

    seconds(a)  # warm-up
    ratios = [seconds(composed) / seconds(a) for _ in range(args.latency_repeats)]
    print(f"latency, composed / A alone: {', '.join(f'{r:.3f}' for r in ratios)}")
    return statistics.median(ratios)


if __name__ == "__main__":
    main()
