"""Training an expert with the decoder frozen: one explicit loop.

Each step samples windows of the corpus (with the text just before each, when a teacher
reads it) and, per window, several augmentation points; the losses (``coprocessor.objective``)
carry the gradient through frozen D into the static prefix and the coprocessor. A watch
(``coprocessor.watch``) measures the expert on a held-out slice of the corpus and on D's own
text as it trains, keeps the best checkpoint and stops on a plateau.
"""

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch

from .compose import ComposedPrefix
from .expert import RECOMMENDED, Coprocessor, CoprocessorConfig, prefix_positions_for
from .generate import Request, generate
from .objective import step_losses
from .prefix import KVPrefix
from .watch import Watch

OBJECTIVES = ("next_token", "distill", "mix")


@dataclass
class TrainConfig:
    # The expert. 4 latents (CoprocessorConfig's default) and 16 points per window: better
    # held-out perplexity in a fixed CPU budget than 8 and 8, and twice the loss tokens per
    # step (bench/quality.py, train_speed.py).
    expert: CoprocessorConfig = field(default_factory=lambda: CoprocessorConfig(**RECOMMENDED))
    # The objective of the windows' tokens (a static prefix): "next_token" (the corpus's own
    # next tokens), "distill" (KL to D reading `teacher_context` tokens of the text just before
    # the window: context distillation) or "mix" (half each). The teacher's pass runs inside
    # the step, so its cost counts in the time budget.
    objective: str = "next_token"
    teacher_context: int = 128
    ahead_tokens: int = 16  # N_A: tokens after the augmentation point that carry the loss
    window: int = 256  # tokens of context per sampled window
    positions_per_window: int = 16  # augmentation points trained from one prefix pass
    windows_per_step: int = 4  # a prefix learns from every token of its windows: 4 fit a step
    min_prefix: int = 16  # never augment before this many tokens of context
    # The optimisation.
    steps: int = 200  # total steps; with a time budget, an upper bound
    time_budget_s: float = 0.0  # > 0: stop after this much training time (or the steps)
    lr: float = 1e-3
    gate_lr: float = 5e-2  # the gate is one scalar per latent; Adam moves it ~gate_lr a step
    prefix_lr: float = 1e-2  # the static prefix's keys and values (Cartridges train at ~1e-2)
    # A new prefix starts as D's cache over this many stretches of the corpus laid end to end
    # (1: one contiguous stretch, as Cartridges; more: a collage of the domain's topics).
    prefix_snippets: int = 1
    # Off-domain anchor: this many windows a step of D's own text (sampled once at the start,
    # replay_pool samples of `window` tokens), trained with the ordinary loss. Its gradient is
    # that of KL(D || D + expert) on D's own distribution: it holds the expert to plain D where
    # its domain is absent, which is what attaching it to the wrong text costs.
    replay_windows: int = 0
    replay_pool: int = 16
    # Coexistence (composition: coprocessor.compose): in this share of the steps the windows
    # read the expert's prefix beside another, as when it is served composed with other
    # experts: D's cache over a stretch of its own text (one of `coexist_pool`, as long as the
    # expert's prefix, behind a gate drawn from -4 to 0), before or after it at random.
    # 0: the expert always alone.
    coexist: float = 0.0
    coexist_pool: int = 8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0  # also seeds the expert's initialisation (from_settings)
    checkpoint_every: int = 50
    # Stopping in time (coprocessor.watch): the tail `validation_fraction` of the tokens is held
    # out and measured `evaluations` times over the run, beside D's own text (the reference for
    # off-domain harm); the best checkpoint within `harm_bound_pct` is kept, and the run stops
    # after `patience` measurements without a new one. 0 evaluations: no watch.
    validation_fraction: float = 0.05
    validation_windows: int = 8
    evaluations: int = 10
    patience: int = 3
    min_improvement: float = 0.002  # relative validation-loss gain that counts as better
    harm_bound_pct: float = 1.0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}")
        if not 0.0 <= self.coexist <= 1.0:
            raise ValueError("coexist is a share of the steps, from 0 to 1")

    @classmethod
    def from_settings(cls, settings, train_tokens=None):
        """A config from one flat dict of settings, as jobs, the CLI and benches name them:
        the expert's fields (``n_latents``, ``lora_rank``, ...) go to ``expert``; ``seed``
        seeds both. Without ``prefix_positions`` among them, a static prefix is sized to
        ``train_tokens`` (``prefix_positions_for``) when that is given."""
        settings = dict(settings)
        expert_fields = {f.name for f in fields(CoprocessorConfig)}
        expert = {k: settings.pop(k) for k in list(settings) if k in expert_fields - {"seed"}}
        expert["seed"] = settings.get("seed", cls.seed)
        if train_tokens is not None and "prefix_positions" not in expert:
            expert["prefix_positions"] = prefix_positions_for(train_tokens)
        expert = {**RECOMMENDED, **expert}
        return cls(expert=CoprocessorConfig(**expert), **settings)

    def settings(self):
        """The flat settings that ``from_settings`` reads back."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "expert"}
        return {**self.expert.to_dict(), **own}

    def to_dict(self):
        return {**asdict(self), "expert": self.expert.to_dict()}


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    tokens_per_s: float
    eta_s: float
    elapsed_s: float
    estimated: bool = False  # total is the time budget's estimate, not config.steps


@dataclass
class TrainResult:
    expert: Coprocessor  # the kept checkpoint's, when the run was watched
    steps: int
    stopped: str  # "done" (all steps), "time", "plateau", "harm" (coprocessor.watch)
    history: list = field(default_factory=list)  # (step, elapsed_s, loss)
    validation: list = field(default_factory=list)  # Measurement dicts, the untrained first
    kept_step: int | None = None  # the step whose expert was kept (None: the last, unwatched)
    within_harm_bound: bool | None = None  # None: unwatched
    summary: str = ""  # why it stopped and what it kept, in a sentence


class Cancelled(Exception):
    pass


def prefix_text(token_ids, config, generator):
    """The text a new static prefix starts from: ``prefix_snippets`` seeded random stretches
    of the corpus, end to end, N_P tokens in all."""
    length = config.expert.prefix_positions
    count = max(1, min(config.prefix_snippets, length))
    sizes = [length // count + (i < length % count) for i in range(count)]
    pieces = []
    for size in sizes:
        high = max(1, len(token_ids) - size + 1)
        start = int(torch.randint(0, high, (1,), generator=generator))
        pieces.append(token_ids[start : start + size])
    return torch.cat(pieces)


@torch.no_grad()
def own_text(decoder, config, samples=None, length=None):
    """``samples`` (default ``replay_pool``) samples of D's own text, ``length`` (default
    ``window``) tokens each after a start token, temperature 1 (seeded), end to end:
    (samples * (length + 1),) on the CPU."""
    start = decoder.config.bos_token_id or 0
    samples, length = samples or config.replay_pool, length or config.window
    requests = [
        Request([start], max_new_tokens=length, temperature=1.0, seed=config.seed + i)
        for i in range(samples)
    ]
    return torch.tensor([[start, *out.token_ids] for out in generate(decoder, requests)]).flatten()


class Sample(NamedTuple):
    windows: torch.Tensor  # (W, T) token ids
    positions: torch.Tensor  # (W, K) augmentation points
    contexts: torch.Tensor  # (W, C) the text just before each window (C may be 0)


def sample_windows(token_ids, config, count, generator, context=0):
    """``count`` random windows, for each ``positions_per_window`` distinct positions and the
    ``context`` tokens of text before it (a distillation teacher reads them)."""
    span = context + config.window
    high = len(token_ids) - span
    if high < 0:
        raise ValueError(
            f"corpus has {len(token_ids)} tokens, fewer than one window ({config.window})"
            + (f" after {context} tokens of context" if context else "")
        )
    starts = torch.randint(0, high + 1, (count,), generator=generator)
    spans = torch.stack([token_ids[s : s + span] for s in starts.tolist()])
    choices = config.window - config.ahead_tokens - config.min_prefix + 1
    if choices < config.positions_per_window:
        raise ValueError("window too short for min_prefix + ahead_tokens and the positions")
    picks = torch.stack(
        [
            torch.randperm(choices, generator=generator)[: config.positions_per_window]
            for _ in range(count)
        ]
    )
    return Sample(spans[:, context:], picks + config.min_prefix, spans[:, :context])


def lr_factor(config, step, progress):
    """Linear warm-up over warmup_steps, then cosine decay to min_lr_ratio by progress 1."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def make_optimizer(expert, config):
    """AdamW with three learning rates: the gates (one scalar per latent or prefix position),
    the static prefix's keys and values, and everything else (the coprocessor)."""
    gates, prefix = [], []
    if expert.has_coprocessor:
        gates.append(expert.latent_head.gate)
    if expert.prefix is not None:
        gates.append(expert.prefix.gate)
        prefix += [expert.prefix.keys, expert.prefix.values]
    special = {id(p) for p in gates + prefix}
    rest = [p for p in expert.parameters() if id(p) not in special]
    groups = [
        {"params": rest, "base_lr": config.lr, "weight_decay": config.weight_decay},
        {"params": gates, "base_lr": config.gate_lr, "weight_decay": 0.0},
        {"params": prefix, "base_lr": config.prefix_lr, "weight_decay": 0.0},
    ]
    groups = [{**g, "lr": g["base_lr"]} for g in groups if g["params"]]
    return torch.optim.AdamW(groups, betas=(0.9, 0.99))


def train(
    decoder,
    token_ids,
    config,
    *,
    expert=None,
    on_progress=None,
    on_check=None,
    reference_ids=None,
    should_stop=None,
    checkpoint_path=None,
    on_checkpoint=None,
    resume_from=None,
    autocast_dtype=None,
):
    """Train an expert on ``token_ids`` (1-D LongTensor) with D frozen.

    on_progress(Progress) is called every step and on_check(Measurement) at every check of
    the watch (coprocessor.watch: a validation slice held out of ``token_ids``, harm on
    ``reference_ids``, ``watch.reference_ids(tokenizer)`` for callers with a tokenizer, else
    D's own text; the best checkpoint kept; a stop on a plateau); should_stop() is read between
    steps and ends the run with Cancelled; every checkpoint_every steps the full state goes
    to checkpoint_path and on_checkpoint(path) is called. resume_from continues a run
    exactly. bf16 autocast on CUDA by default, fp32 on CPU. The watch's time counts in the
    time budget, as the teacher's does.
    """
    decoder.requires_grad_(False)
    decoder.eval()
    device = next(decoder.parameters()).device
    if autocast_dtype is None and device.type == "cuda":
        autocast_dtype = torch.bfloat16
    torch.manual_seed(config.seed)
    expert = expert or Coprocessor(decoder, config.expert)
    expert.to(device).train()
    optimizer = make_optimizer(expert, config)
    generator = torch.Generator().manual_seed(config.seed)
    token_ids, validation_ids, unwatched = Watch.split(token_ids.to(device), config)
    step, elapsed, history, saved_watch = 0, 0.0, [], None
    if resume_from is not None:
        step, elapsed, history, saved_watch = load_checkpoint(
            resume_from, expert, optimizer, generator
        )
    elif expert.prefix is not None:
        expert.prefix.initialize_from(decoder, prefix_text(token_ids, config, generator))
    # D's own text, generated once (seeded: the same again on resume, where its time is
    # already counted): the replay windows, and the watch's reference if none is given.
    started = time.perf_counter()
    replay_ids = own_text(decoder, config) if config.replay_windows else None
    neighbours = None
    if config.coexist and expert.prefix is not None:
        neighbours = neighbour_prefixes(decoder, config, neighbour_text(decoder, config))
    watch = None
    if validation_ids is not None:
        if reference_ids is None:
            reference_ids = replay_ids if replay_ids is not None else own_text(decoder, config)
        watch = Watch.start(decoder, config, validation_ids, reference_ids.to(device))
        if saved_watch is not None:
            watch.load_state_dict(saved_watch)
    if resume_from is None:
        elapsed += time.perf_counter() - started
    stopped = "done"
    tokens_per_step = loss_tokens_per_step(config)
    began_at, began_step = elapsed, step  # the pace counts this run's steps and checks only
    while step < config.steps:
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled at step {step}")
        if config.time_budget_s and elapsed >= config.time_budget_s:
            stopped = "time"
            break
        if watch is not None and watch.due(step, elapsed):
            elapsed += _check(watch, expert, step, elapsed, on_check)
            if watch.should_stop():
                stopped = watch.stop_reason()
                break
        started = time.perf_counter()
        # whichever of the step count and the time budget will end the run first
        progress = step / max(config.steps, 1)
        if config.time_budget_s:
            progress = max(progress, elapsed / config.time_budget_s)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(config, step, progress)
        loss = train_step(
            decoder,
            expert,
            token_ids,
            config,
            optimizer,
            generator,
            device,
            autocast_dtype,
            replay_ids=replay_ids,
            neighbours=neighbours,
        )
        step += 1
        took = time.perf_counter() - started
        elapsed += took
        history.append((step, round(elapsed, 3), loss))
        if on_progress is not None:
            pace = (elapsed - began_at) / (step - began_step)
            on_progress(_progress(config, step, loss, elapsed, pace, took, tokens_per_step))
        if checkpoint_path and config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(
                checkpoint_path, expert, optimizer, generator, step, elapsed, history, config, watch
            )
            if on_checkpoint is not None:
                on_checkpoint(checkpoint_path)
    expert.eval()
    result = TrainResult(expert=expert, steps=step, stopped=stopped, history=history)
    if watch is None:
        result.summary = f"{step} steps ({stopped}); not watched: {unwatched}"
        return result
    if not watch.curve or watch.curve[-1].step != step:  # the last expert is a candidate
        _check(watch, expert, step, elapsed, on_check)
    kept = watch.restore(expert)
    result.validation = [m.to_dict() for m in watch.curve]
    result.kept_step = kept.step if kept else None
    result.within_harm_bound = watch.within_bound
    result.summary = watch.summary(stopped)
    return result


def _check(watch, expert, step, elapsed, on_check):
    """One check of the watch; returns the seconds it took (they count in the budget)."""
    started = time.perf_counter()
    expert.eval()
    measured = watch.check(expert, step, elapsed)
    expert.train()
    if on_check is not None:
        on_check(measured)
    return time.perf_counter() - started


def loss_tokens_per_step(config):
    """Tokens that carry the loss in one step: the windows' own with a static prefix, and the
    K x N_A after the latents with a coprocessor."""
    per_window = 0
    if config.expert.prefix_positions:
        per_window += config.window - 1
    if config.expert.n_latents:
        per_window += config.positions_per_window * config.ahead_tokens
    return (config.windows_per_step + config.replay_windows) * config.grad_accum * per_window


def train_step(
    decoder,
    expert,
    token_ids,
    config,
    optimizer,
    generator,
    device,
    autocast,
    replay_ids=None,
    neighbours=None,
):
    """One optimiser step over ``config.grad_accum`` sampled batches; returns the mean loss.
    ``replay_ids``: D's own text (``own_text``) to add ``config.replay_windows`` windows of,
    trained with the next-token loss (its gradient is already that of KL(D || D + expert)).
    ``neighbours``: prefixes to put beside the expert's in ``config.coexist`` of the steps."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    context = 0 if config.objective == "next_token" else config.teacher_context
    for _ in range(config.grad_accum):
        batches = [
            (
                sample_windows(
                    token_ids.cpu(), config, config.windows_per_step, generator, context
                ),
                config.objective,
                beside(expert, neighbours, config, generator),
            )
        ]
        if replay_ids is not None:
            replay = sample_windows(replay_ids, config, config.replay_windows, generator)
            batches.append((replay, "next_token", None))
        with torch.autocast(
            device.type, dtype=autocast or torch.float32, enabled=autocast is not None
        ):
            losses = [
                step_losses(
                    decoder,
                    expert,
                    sample.windows.to(device),
                    sample.positions.to(device),
                    config.ahead_tokens,
                    objective,
                    sample.contexts.to(device),
                    prefix,
                )
                for sample, objective, prefix in batches
            ]
            loss = torch.cat(losses).mean() / config.grad_accum
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(expert.parameters(), config.max_grad_norm)
    optimizer.step()
    return total


def neighbour_text(decoder, config):
    """D's own text for the neighbours: one sample per neighbour, just long enough (each
    token generated costs a decode step of the training's time budget)."""
    return own_text(decoder, config, config.coexist_pool, config.expert.prefix_positions)


@torch.no_grad()
def neighbour_prefixes(decoder, config, own_ids):
    """``config.coexist_pool`` prefixes such as another expert brings: D's cache over seeded
    random stretches of its own text (``own_ids``), each behind one gate value from -4 to 0,
    as long as the expert's own prefix. Never trained."""
    size = config.expert.prefix_positions
    device = next(decoder.parameters()).device
    generator = torch.Generator().manual_seed(config.seed + 1)  # the same again on resume
    neighbours = []
    for _ in range(config.coexist_pool):
        gate = -4.0 * float(torch.rand((), generator=generator))
        neighbour = KVPrefix(decoder.config, size, gate_init=gate).to(device)
        start = int(torch.randint(0, len(own_ids) - size + 1, (), generator=generator))
        neighbour.initialize_from(decoder, own_ids[start : start + size])
        neighbours.append(neighbour.requires_grad_(False))
    return neighbours


def beside(expert, neighbours, config, generator):
    """The prefix the step's windows read: None (the expert's own), or in ``config.coexist``
    of the steps the expert's composed with a random neighbour, before or after it."""
    if not neighbours or float(torch.rand((), generator=generator)) >= config.coexist:
        return None
    neighbour = neighbours[int(torch.randint(len(neighbours), (), generator=generator))]
    first = float(torch.rand((), generator=generator)) < 0.5
    pair = [expert.prefix, neighbour] if first else [neighbour, expert.prefix]
    return ComposedPrefix(pair)


def _progress(config, step, loss, elapsed, pace, took, tokens_per_step):
    """Progress after ``step``; ``pace`` is the seconds per step so far, checks included.
    With a time budget the total is an estimate: the steps the time left holds at that pace
    (it settles as the pace does, instead of scaling the setup's seconds into it)."""
    total, estimated = config.steps, False
    if config.time_budget_s:
        fits = step + int(max(0.0, config.time_budget_s - elapsed) / max(pace, 1e-9))
        estimated = fits < config.steps
        total = min(fits, config.steps)
    return Progress(
        step=step,
        total=total,
        loss=loss,
        tokens_per_s=tokens_per_step / took,
        eta_s=(total - step) * pace,
        elapsed_s=elapsed,
        estimated=estimated,
    )


def save_checkpoint(path, expert, optimizer, generator, step, elapsed, history, config, watch=None):
    """Everything needed to continue exactly: weights, optimizer, sampler state, counters."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "expert": expert.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "step": step,
            "elapsed": elapsed,
            "history": history,
            "config": config.to_dict(),
            "watch": None if watch is None else watch.state_dict(),
        },
        tmp,
    )
    tmp.replace(path)  # never leave a half-written checkpoint behind


def load_checkpoint(path, expert, optimizer, generator):
    # Our own checkpoints only; weights_only refuses anything but tensors and plain data.
    state = torch.load(path, map_location="cpu", weights_only=True)
    expert.load_state_dict(state["expert"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    history = [tuple(h) for h in state["history"]]
    return state["step"], state["elapsed"], history, state.get("watch")
