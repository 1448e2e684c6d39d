"""Quality of a trained expert against the plain decoder and two baselines, same budget.

Trains, each for the same wall-time budget on the same data: (1) the expert (coprocessor
LoRA + soft tokens + latent head), (2) the N_L soft tokens alone placed the same way with no
coprocessor, (3) a PEFT LoRA fine-tune of the decoder itself. Evaluates all on the same fixed
held-out (window, position) pairs: perplexity of the next N_A tokens per ahead position.

    python bench/quality.py [--budget-min 15] [--text corpus.txt]

Ends with RESULT ppl_base ppl_expert reduction_pct lora_finetune_reduction_pct
soft_tokens_reduction_pct step0_harm_pct.
"""

import time

import torch
from common import add_expert_arguments, corpus_ids, parser, peft_lora_copy, setup, train_config

from coprocessor.evaluate import evaluate, heldout_set
from coprocessor.expert import Coprocessor, SoftTokens
from coprocessor.train import sample_windows, train


def main():
    p = parser(__doc__)
    p.add_argument("--budget-min", type=float, default=15.0, help="training minutes per arm")
    add_expert_arguments(p)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--curve-points", type=int, default=5)
    p.add_argument(
        "--arms",
        default="expert,soft,lora",
        help="which of expert, soft, lora to train (experiments: fewer)",
    )
    args = p.parse_args()
    arms = set(args.arms.split(","))
    model, tokenizer = setup(args)
    train_ids, heldout_ids = corpus_ids(args, tokenizer)
    heldout = heldout_set(
        heldout_ids, window=args.window, ahead=args.ahead, positions_per_window=4, max_windows=21
    )
    config = train_config(args, tokenizer, steps=100_000, time_budget_s=args.budget_min * 60)
    print(f"settings: {config.to_dict()}")
    print(
        f"held-out: {heldout.pairs} (window, position) pairs, {heldout.pairs * args.ahead} "
        "target tokens"
    )

    step0 = evaluate(model, Coprocessor(model, config.expert), heldout)
    ppl_base = step0["base"]["ppl"]
    step0_harm = 100 * (step0["augmented"]["ppl"] - ppl_base) / ppl_base
    print(
        f"plain decoder ppl {ppl_base:.3f}; untrained expert {step0['augmented']['ppl']:.3f} "
        f"({step0_harm:+.2f}%)"
    )

    reports = {"base": step0["base"]}
    if "expert" in arms:
        expert, curve = train_with_curve(model, train_ids, config, heldout, args.curve_points)
        reports["expert"] = evaluate(model, expert, heldout, include_base=False)["augmented"]
        print_curve(curve, ppl_base)
    if "soft" in arms:
        soft = SoftTokens(
            model, args.n_latents, config.expert.gate_init, config.expert.anchor_token_id
        )
        soft_result = train(model, train_ids, config, expert=soft)
        reports["soft tokens"] = evaluate(model, soft_result.expert, heldout, include_base=False)[
            "augmented"
        ]
        print(f"soft tokens: {soft_result.steps} steps, ppl {reports['soft tokens']['ppl']:.3f}")
    if "lora" in arms:
        finetuned, finetune_steps = lora_finetune(model, train_ids, config, args)
        reports["LoRA fine-tune"] = evaluate(finetuned, None, heldout)["base"]
        print(f"LoRA fine-tune: {finetune_steps} steps, ppl {reports['LoRA fine-tune']['ppl']:.3f}")
    print_table(reports, args.ahead)
    reduction = {name: 100 * (ppl_base - r["ppl"]) / ppl_base for name, r in reports.items()}
    result = [f"ppl_base={ppl_base:.3f}"]
    if "expert" in reports:
        result += [
            f"ppl_expert={reports['expert']['ppl']:.3f}",
            f"reduction_pct={reduction['expert']:.2f}",
        ]
    if "LoRA fine-tune" in reports:
        result.append(f"lora_finetune_reduction_pct={reduction['LoRA fine-tune']:.2f}")
    if "soft tokens" in reports:
        result.append(f"soft_tokens_reduction_pct={reduction['soft tokens']:.2f}")
    result.append(f"step0_harm_pct={step0_harm:.2f}")
    print("RESULT " + " ".join(result))


def train_with_curve(model, train_ids, config, heldout, points):
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
    result = train(model, train_ids, config, expert=expert_ref[0], on_progress=on_progress)
    final = evaluate(model, result.expert, heldout, include_base=False)["augmented"]["ppl"]
    curve.append((result.history[-1][1], result.steps, final))
    print(
        f"expert: {result.steps} steps in {result.history[-1][1]:.0f} s, gate "
        f"{result.expert.latent_head.gate.mean().item():.2f}"
    )
    return result.expert, curve


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
        windows, _ = sample_windows(train_ids, config, config.windows_per_step, generator)
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


def print_table(reports, ahead):
    names = list(reports)
    print("\nperplexity per ahead position")
    print(f"{'pos':>4} " + " ".join(f"{n:>15}" for n in names))
    for i in range(ahead):
        print(f"{i + 1:4d} " + " ".join(f"{reports[n]['ppl_by_position'][i]:15.3f}" for n in names))
    print(f"{'all':>4} " + " ".join(f"{reports[n]['ppl']:15.3f}" for n in names))


if __name__ == "__main__":
    main()
