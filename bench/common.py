"""Shared set-up of the ML benchmarks: threads, the real base model, the corpus."""

import argparse
import copy
import gzip
import os
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coprocessor import base_models, corpus  # noqa: E402
from coprocessor.train import TrainConfig  # noqa: E402

MODEL_CACHE = ROOT / "var" / "base_models" / base_models.DEFAULT_SLUG


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--text", help="a .txt or .jsonl corpus instead of the Python docs")
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("BENCH_THREADS", 2)),
        help="torch threads; more than the free cores slows CPU runs down",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def setup(args):
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = base_models.load_default(MODEL_CACHE, device=args.device)
    print(
        f"base model {base_models.DEFAULT_SLUG} on {args.device}, loaded in "
        f"{time.perf_counter() - started:.1f} s, {args.threads} threads"
    )
    return model, tokenizer


def corpus_ids(args, tokenizer, name=None):
    """Token ids of the train and held-out parts of ``--text``, or of the named corpus
    (``domain_texts``; default the Python docs)."""
    if args.text and name is None:
        train, heldout = corpus.split_texts(corpus.read_texts(args.text))
        name = args.text
    else:
        name = name or "python-docs"
        train, heldout = split_documents(domain_texts()[name])
    train_ids, heldout_ids = corpus.tokenize(tokenizer, train), corpus.tokenize(tokenizer, heldout)
    print(f"corpus {name}: {len(train_ids)} training tokens, {len(heldout_ids)} held-out")
    return train_ids, heldout_ids


def split_documents(texts, heldout_every=10):
    """Every 10th document held out (the Python docs: by topic, as ``corpus.demo_split``)."""
    train = [text for i, text in enumerate(texts) if i % heldout_every]
    heldout = [text for i, text in enumerate(texts) if not i % heldout_every]
    return train, heldout


def domain_texts():
    """Corpora of distinct domains that ship on this machine, as lists of documents: the
    Python docs (``pydoc_data``), software licences, and the first 400 Unix manual pages of
    section 1. Those depend on the Debian packages installed (``make chromium`` adds some):
    the token counts the benches print tell which set a figure was measured on."""
    domains = {"python-docs": [text for _, text in corpus.pydoc_topics()]}
    licences = sorted(Path("/usr/share/common-licenses").glob("*"))
    if licences:
        domains["licences"] = [p.read_text(errors="replace") for p in licences]
    manuals = sorted(Path("/usr/share/man/man1").glob("*.1.gz"))[:400]
    if manuals:
        domains["unix-manuals"] = [strip_troff(m) for m in manuals]
    return domains


def strip_troff(path):
    lines = []
    with gzip.open(path, "rt", errors="replace") as f:
        source = f.readlines()
    for line in source:
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            line = line.split(" ", 1)[1] if " " in line else ""
        lines.append(re.sub(r"\\f[A-Z]|\\f\(..|\\[-&|^e(]|\\\*\(..", "", line))
    return "".join(lines)


def add_expert_arguments(p):
    """The expert's shape and optimiser, shared by the benchmarks that train one; the defaults
    are TrainConfig's, so a bench measures what a job would train."""
    defaults = TrainConfig().settings()
    p.add_argument("--n-latents", type=int, default=defaults["n_latents"])
    p.add_argument("--ahead", type=int, default=defaults["ahead_tokens"])
    p.add_argument("--window", type=int, default=defaults["window"])
    p.add_argument(
        "--positions",
        type=int,
        default=defaults["positions_per_window"],
        help="augmentation points per window",
    )
    p.add_argument("--windows-per-step", type=int, default=defaults["windows_per_step"])
    p.add_argument("--lora-rank", type=int, default=defaults["lora_rank"])
    p.add_argument("--lr", type=float, default=defaults["lr"])
    p.add_argument("--gate-lr", type=float, default=defaults["gate_lr"])
    p.add_argument(
        "--prefix-positions",
        type=int,
        default=defaults["prefix_positions"],
        help="N_P of the static prefix (0: none)",
    )
    p.add_argument("--prefix-lr", type=float, default=defaults["prefix_lr"])
    p.add_argument("--prefix-gate-init", type=float, default=defaults["prefix_gate_init"])
    p.add_argument("--prefix-snippets", type=int, default=defaults["prefix_snippets"])
    p.add_argument(
        "--replay-windows",
        type=int,
        default=defaults["replay_windows"],
        help="windows of D's own text per step (the off-domain anchor)",
    )
    p.add_argument("--replay-pool", type=int, default=defaults["replay_pool"])
    p.add_argument(
        "--min-lr-ratio",
        type=float,
        default=defaults["min_lr_ratio"],
        help="where the cosine decay ends, as a share of each learning rate (1: constant)",
    )


def train_config(args, tokenizer, **overrides):
    """The TrainConfig those arguments describe; latents start from a space token."""
    settings = dict(
        n_latents=args.n_latents,
        ahead_tokens=args.ahead,
        window=args.window,
        positions_per_window=args.positions,
        windows_per_step=args.windows_per_step,
        lora_rank=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        lr=args.lr,
        gate_lr=args.gate_lr,
        prefix_positions=args.prefix_positions,
        prefix_lr=args.prefix_lr,
        prefix_gate_init=args.prefix_gate_init,
        prefix_snippets=args.prefix_snippets,
        replay_windows=args.replay_windows,
        replay_pool=args.replay_pool,
        min_lr_ratio=args.min_lr_ratio,
        anchor_token_id=space_token(tokenizer),
    )
    return TrainConfig.from_settings({**settings, **overrides})


def space_token(tokenizer):
    return base_models.space_token_id(tokenizer)


def peft_lora_copy(model, rank, alpha):
    """A PEFT LoRA fine-tune of a copy of ``model`` on every linear layer of its blocks: the
    baseline a user would pick instead of an expert (it changes the base)."""
    from peft import LoraConfig, get_peft_model

    targets = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n
        }
    )
    return get_peft_model(
        copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    )
