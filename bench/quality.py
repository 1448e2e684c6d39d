"""Quality of a trained expert against the plain decoder and two baselines, same budget.

Trains, each for the same wall-time budget on the same data: (1) the expert as the settings
describe it (by default TrainConfig's: what a job trains), (2) the N_L soft tokens alone placed
the same way with no coprocessor, (3) a PEFT LoRA fine-tune of the decoder itself. Evaluates
all on the same fixed held-out (window, position) pairs of the corpus (perplexity of the next
N_A tokens per ahead position) and on those of another domain's corpus (``--offdomain``): what
attaching the expert to the wrong text costs.

    python bench/quality.py [--budget-min 15] [--corpus python-docs] [--offdomain unix-manuals]
        [--prefix-positions 64 --n-latents 0 ...]

Ends with RESULT ppl_base ppl_expert reduction_pct lora_finetune_reduction_pct
soft_tokens_reduction_pct step0_harm_pct offdomain_harm_pct lora_offdomain_harm_pct
stopped_at_s (the figures of arms not run are left out; stopped_at_s: the training seconds
when the expert's run stopped, its watch's checks and its teacher included).
"""

import time

import torch
from common import (
    add_expert_arguments,
    budget_config,
    corpus_ids,
    parse,
    parser,
    peft_lora_copy,
    setup,
)

from coprocessor.evaluate import evaluate, heldout_set
from coprocessor.expert import Coprocessor, SoftTokens
from coprocessor.train import prefix_text, sample_windows, train
from coprocessor.watch import reference_ids


def main():
    p = parser(__doc__)
    p.add_argument("--budget-min", type=float, default=15.0, help="training minutes per arm")
    p.add_argument("--corpus", default="python-docs", help="python-docs, unix-manuals, licences")
    p.add_argument("--offdomain", default="unix-manuals", help="the corpus of another domain")
    add_expert_arguments(p)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--curve-points", type=int, default=5)
    p.add_argument("--heldout-windows", type=int, default=21, help="held-out windows per corpus")
    p.add_argument(
        "--train-tokens",
        type=int,
        default=0,
        help="train on the first this many tokens only (a small corpus; 0: all)",
    )
    p.add_argument(
        "--arms",
        default="expert,soft,lora",
        help="which of expert, soft, lora to train (experiments: fewer)",
    )
    # Every arm, for a second each: the smoke run prints every key of the full run.
    args = parse(
        p,
        smoke=dict(
            budget_min=0.25 / 60, curve_points=2, window=64, windows_per_step=2, heldout_windows=2
        ),
    )
    arms = set(args.arms.split(","))
    model, tokenizer = setup(args)
    train_ids, heldout_ids = corpus_ids(args, tokenizer, None if args.text else args.corpus)
    if args.train_tokens:
        train_ids = train_ids[: args.train_tokens]
        print(f"training on the first {len(train_ids)} tokens only")
    heldout = make_heldout(heldout_ids, args)
    offdomain = make_heldout(corpus_ids(args, tokenizer, args.offdomain)[1], args)
    config = budget_config(args, tokenizer, len(train_ids))
    print(f"settings: {config.to_dict()}")
    print(
        f"held-out: {heldout.pairs} (window, position) pairs, {heldout.pairs * args.ahead} "
        f"target tokens; off-domain ({args.offdomain}): {offdomain.pairs} pairs"
    )

    untrained = Coprocessor(model, config.expert)
    if untrained.prefix is not None:  # as train() starts it
        text = prefix_text(train_ids, config, torch.Generator().manual_seed(config.seed))
        untrained.prefix.initialize_from(model, text)
    step0 = evaluate(model, untrained, heldout)
    base = {"in": step0["base"], "off": evaluate(model, None, offdomain)["base"]}
    step0_harm = change(step0["augmented"], base["in"])
    print(
        f"plain decoder ppl {base['in']['ppl']:.3f} (off-domain {base['off']['ppl']:.3f}); "
        f"untrained expert {step0['augmented']['ppl']:.3f} ({step0_harm:+.2f}%)"
    )

    reports, stopped_at_s = {}, None
    if "expert" in arms:
        reference = reference_ids(tokenizer)
        result, curve = train_with_curve(
            model, train_ids, config, heldout, args.curve_points, reference
        )
        reports["expert"] = measure(model, result.expert, None, heldout, offdomain)
        print_curve(curve, base["in"]["ppl"])
        print_watch(result)
        stopped_at_s = result.history[-1][1] if result.history else 0.0
    if "soft" in arms:
        soft = SoftTokens(
            model, args.n_latents or 4, config.expert.gate_init, config.expert.anchor_token_id
        )
        soft_result = train(model, train_ids, config, expert=soft)
        reports["soft tokens"] = measure(model, soft_result.expert, None, heldout, offdomain)
        print(f"soft tokens: {soft_result.steps} steps")
    if "lora" in arms:
        finetuned, finetune_steps = lora_finetune(model, train_ids, config, args)
        reports["LoRA fine-tune"] = measure(finetuned, None, "base", heldout, offdomain)
        print(f"LoRA fine-tune: {finetune_steps} steps")
    print_table(base, reports, args.ahead)
    fields = result_fields(base, reports, step0_harm)
    if stopped_at_s is not None:
        fields.append(f"stopped_at_s={stopped_at_s:.0f}")
    print("RESULT " + " ".join(fields))


def make_heldout(ids, args):
    return heldout_set(
        ids,
        window=args.window,
        ahead=args.ahead,
        positions_per_window=4,
        max_windows=args.heldout_windows,
    )


def measure(model, expert, which, heldout, offdomain):
    """An arm's reports on its own corpus and the other domain's, printed at once (a later
    arm that fails loses nothing)."""
    which = which or "augmented"
    plain = which == "base"  # the fine-tuned decoder itself
    report = {
        "in": evaluate(model, expert, heldout, include_base=plain)[which],
        "off": evaluate(model, expert, offdomain, include_base=plain)[which],
    }
    print(
        f"  measured: ppl {report['in']['ppl']:.3f} on its corpus, "
        f"{report['off']['ppl']:.3f} off-domain",
        flush=True,
    )
    return report


def change(report, base):
    """Perplexity change against the plain decoder, in percent (negative: better)."""
    return 100 * (report["ppl"] - base["ppl"]) / base["ppl"]


def result_fields(base, reports, step0_harm):
    fields = [f"ppl_base={base['in']['ppl']:.3f}"]
    if "expert" in reports:
        fields += [
            f"ppl_expert={reports['expert']['in']['ppl']:.3f}",
            f"reduction_pct={-change(reports['expert']['in'], base['in']):.2f}",
        ]
    for name, field in (("LoRA fine-tune", "lora_finetune"), ("soft tokens", "soft_tokens")):
        if name in reports:
            fields.append(f"{field}_reduction_pct={-change(reports[name]['in'], base['in']):.2f}")
    fields.append(f"step0_harm_pct={step0_harm:.2f}")
    if "expert" in reports:
        fields.append(f"offdomain_harm_pct={change(reports['expert']['off'], base['off']):.2f}")
    if "LoRA fine-tune" in reports:
        harm = change(reports["LoRA fine-tune"]["off"], base["off"])
        fields.append(f"lora_offdomain_harm_pct={harm:.2f}")
    return fields


def train_with_curve(model, train_ids, config, heldout, points, reference):
    """Train the expert; evaluate it at evenly spaced training times (not counted in them)."""
    marks = [config.time_budget_s * (i + 1) / points for i in range(points - 1)]
    curve = []

    def on_progress(progress):
        if marks and progress.elapsed_s >= marks[0]:
            marks.pop(0)
            report = evaluate(model, expert_ref[0], heldout, include_base=False)
            curve.append((progress.elapsed_s, progress.step, report["augmented"]["ppl"]))
            print(
                f"  expert at {progress.elapsed_s:6.0f} s, step {progress.step}: "
                f"loss {progress.loss:.3f}, held-out ppl {curve[-1][2]:.3f}",
                flush=True,
            )

    expert_ref = [Coprocessor(model, config.expert)]
    result = train(
        model,
        train_ids,
        config,
        expert=expert_ref[0],
        on_progress=on_progress,
        reference_ids=reference,
    )
    final = evaluate(model, result.expert, heldout, include_base=False)["augmented"]["ppl"]
    curve.append((result.history[-1][1], result.steps, final))
    print(f"expert: {result.steps} steps in {result.history[-1][1]:.0f} s, {gates(result.expert)}")
    return result, curve


def print_watch(result):
    """The job's own view of the run: its validation checks and what it kept."""
    if not result.validation:
        print(f"\n{result.summary}")
        return
    print("\nvalidation checks (the slice held out of the training text; harm: the reference text)")
    print(f"{'step':>6} {'seconds':>8} {'reduction':>10} {'harm':>8}")
    for m in result.validation:
        kept = "  <- kept" if m["step"] == result.kept_step else ""
        print(
            f"{m['step']:6d} {m['elapsed_s']:8.0f} {m['reduction_pct']:9.2f}% "
            f"{m['harm_pct']:+7.2f}%{kept}"
        )
    print(result.summary)


def gates(expert):
    parts = []
    if expert.has_coprocessor:
        parts.append(f"latent gate {expert.latent_head.gate.mean().item():.2f}")
    if expert.prefix is not None:
        gate = expert.prefix.gate
        parts.append(
            f"prefix gate mean {gate.mean().item():.2f} "
            f"(min {gate.min().item():.2f}, max {gate.max().item():.2f})"
        )
    return ", ".join(parts)


def lora_finetune(model, train_ids, config, args):
    """What a user would pick instead: PEFT LoRA on the decoder itself, plain LM loss."""
    tuned = peft_lora_copy(model, args.lora_rank, 2 * args.lora_rank)
    optimizer = torch.optim.AdamW(
        [p for p in tuned.parameters() if p.requires_grad], lr=args.finetune_lr
    )
    generator = torch.Generator().manual_seed(config.seed)
    tuned.train()
    elapsed, steps = 0.0, 0
    while elapsed < config.time_budget_s:
        started = time.perf_counter()
        windows = sample_windows(train_ids, config, config.windows_per_step, generator).windows
        windows = windows.to(args.device)
        loss = tuned(input_ids=windows, labels=windows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        elapsed += time.perf_counter() - started
    # Fold the deltas in: the fine-tuned model is then an ordinary decoder to evaluate.
    return tuned.merge_and_unload().eval(), steps


def print_curve(curve, ppl_base):
    print("\nheld-out perplexity of the expert against training time")
    print(f"{'seconds':>8} {'step':>6} {'ppl':>8} {'vs base':>8}")
    for seconds, step, ppl in curve:
        print(f"{seconds:8.0f} {step:6d} {ppl:8.3f} {100 * (ppl - ppl_base) / ppl_base:+7.2f}%")


def print_table(base, reports, ahead):
    reports = {"base": base, **reports}
    names = list(reports)
    print("\nperplexity per ahead position (own corpus)")
    print(f"{'pos':>4} " + " ".join(f"{n:>15}" for n in names))
    for i in range(ahead):
        row = " ".join(f"{reports[n]['in']['ppl_by_position'][i]:15.3f}" for n in names)
        print(f"{i + 1:4d} {row}")
    print(f"{'all':>4} " + " ".join(f"{reports[n]['in']['ppl']:15.3f}" for n in names))
    print(f"{'off':>4} " + " ".join(f"{reports[n]['off']['ppl']:15.3f}" for n in names))


if __name__ == "__main__":
    main()
