"""Training an expert: the paper's objective with the frozen decoder, one explicit loop.

Each step samples windows of the corpus, runs the frozen decoder once over each window (no
gradient), and picks several augmentation positions p per window. For each p the coprocessor
reads the cache of ``x[:p-1]``, its latents go in before ``x[p-1]``, and the loss is the
decoder's own language-modelling loss on the next ``ahead_tokens`` tokens ``x[p:p+ahead]``.
All positions of all windows form one batch: one prefix pass serves many positions, which is
the main lever on speed. Gradients flow through frozen D into the latents and C.
"""

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .decoder import (
    as_cache,
    block_attention_bias,
    embed,
    forward_with_mask,
    negative,
    prefill,
    run_decoder,
)
from .expert import RECOMMENDED, Coprocessor, CoprocessorConfig
from .generate import Request, generate
from .prefix import batch_prefixes


@dataclass
class TrainConfig:
    # The expert. 4 latents (CoprocessorConfig's default) and 16 points per window: better
    # held-out perplexity in a fixed CPU budget than 8 and 8, and twice the loss tokens per
    # step (bench/quality.py, train_speed.py).
    expert: CoprocessorConfig = field(default_factory=lambda: CoprocessorConfig(**RECOMMENDED))
    # The objective.
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
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0  # also seeds the expert's initialisation (from_settings)
    checkpoint_every: int = 50

    @classmethod
    def from_settings(cls, settings):
        """A config from one flat dict of settings, as jobs, the CLI and benches name them:
        the expert's fields (``n_latents``, ``lora_rank``, ...) go to ``expert``; ``seed``
        seeds both."""
        settings = dict(settings)
        expert_fields = {f.name for f in fields(CoprocessorConfig)}
        expert = {k: settings.pop(k) for k in list(settings) if k in expert_fields - {"seed"}}
        expert["seed"] = settings.get("seed", cls.seed)
        return cls(expert=CoprocessorConfig(**{**RECOMMENDED, **expert}), **settings)

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


@dataclass
class TrainResult:
    expert: Coprocessor
    steps: int
    stopped: str  # "done", "time", "cancelled"
    history: list = field(default_factory=list)  # (step, elapsed_s, loss)


class Cancelled(Exception):
    pass


def position_batch(decoder, windows, positions, ahead, prefix=None):
    """Rows for the augmented forward: one per (window, position).

    windows: (W, T) token ids; positions: (W, K) indices p of the first target token; prefix:
    the expert's static prefix (a ``KVPrefix``) or None. Returns past, past_bias (the prefix's
    columns first), tokens (R, ahead), targets (R, ahead), start positions (R,).
    """
    n_windows, length = windows.shape
    per_window = positions.shape[1]
    dtype = next(decoder.parameters()).dtype
    with torch.no_grad():
        cache = window_cache(decoder, prefix, windows)
    rows = torch.arange(n_windows, device=windows.device).repeat_interleave(per_window)  # (R,)
    past = [(k[rows], v[rows]) for k, v in cache.past]  # (R, kv_heads, N_P + T, head_dim)
    p = positions.reshape(-1)  # (R,) with R = W * K
    keys = torch.arange(length, device=windows.device)
    window_bias = torch.where(keys[None, :] < (p - 1)[:, None], 0.0, negative(dtype)).to(dtype)
    # (R, N_P + T): each row sees the prefix and x[:p-1]
    past_bias = torch.cat([cache.prefix_bias[rows], window_bias], dim=1)
    offsets = torch.arange(ahead, device=windows.device)
    fed = (p - 1)[:, None] + offsets  # (R, A): x[p-1 : p-1+ahead]
    tokens = windows[rows[:, None], fed]
    targets = windows[rows[:, None], fed + 1]
    return past, past_bias, tokens, targets, p - 1 + cache.offset


class WindowCache(NamedTuple):
    past: list  # D's cache over the prefix (if any) and the windows: (W, kv_heads, N_P + T, d)
    prefix_bias: torch.Tensor  # (W, N_P) the prefix's gate; (W, 0) without one
    offset: int  # N_P: the position the windows' first token takes
    losses: torch.Tensor | None  # (W, T - 1) next-token losses over the windows, with a prefix


def window_cache(decoder, prefix, windows):
    """D over whole windows (W, T), after the static prefix when there is one.

    Without a prefix, the plain cache (callers run it without gradient). With one, the
    windows read it, so the pass carries the gradient to it and also gives the windows' own
    next-token losses: the prefix's objective, as a fine-tune's, on every token.
    """
    visible = torch.ones_like(windows, dtype=torch.bool)
    if prefix is None:
        prefilled = prefill(decoder, windows, visible)
        return WindowCache(prefilled.past, prefilled.past_bias[:, :0], 0, None)
    dtype = next(decoder.parameters()).dtype
    n_windows, length = windows.shape
    batch = batch_prefixes([prefix] * n_windows, dtype, windows.device)
    positions = prefix.n_positions + torch.arange(length, device=windows.device)
    hidden, past = run_decoder(
        decoder,
        past=batch.past,
        past_bias=batch.bias,
        inputs_embeds=embed(decoder, windows),
        new_bias=torch.zeros(n_windows, length, dtype=dtype, device=windows.device),
        positions=positions.expand(n_windows, -1),
    )
    logits = decoder.get_output_embeddings()(hidden[:, :-1])  # (W, T - 1, V)
    losses = F.cross_entropy(logits.float().transpose(1, 2), windows[:, 1:], reduction="none")
    return WindowCache(past, batch.bias, prefix.n_positions, losses)


def packed_losses(decoder, expert, windows, positions, ahead, cache=None):
    """Per-token losses (W, K, A) for K augmentation points per window, packed in one row.

    Each window's cache is computed once and shared: the K blocks of soft tokens (C pass) and
    of [latents, tokens] (D pass) sit side by side after it, each block seeing only its own
    prefix ``x[:p-1]`` (and the static prefix, if any) and itself. Equal to one row per point
    (``position_batch``), without copying the cache K times. ``expert=None`` gives the plain
    decoder's losses; ``cache`` is the windows' ``window_cache`` when the caller has it.
    """
    n_windows, length = windows.shape
    per_window = positions.shape[1]
    device = windows.device
    if cache is None:
        with torch.no_grad():
            cache = window_cache(decoder, None, windows)
    past = cache.past
    dtype = past[0][0].dtype
    starts = positions - 1  # (W, K) index of x[p-1], the first fed token
    visible = torch.arange(length, device=device)[None, None, :] < starts[:, :, None]  # (W, K, T)
    key_bias = _window_key_bias(visible, cache.prefix_bias)  # (W, K, N_P + T)
    offsets = torch.arange(ahead, device=device)
    fed = starts[:, :, None] + offsets  # (W, K, A)
    rows = torch.arange(n_windows, device=device)[:, None, None]
    tokens, targets = windows[rows, fed], windows[rows, fed + 1]
    inputs = embed(decoder, tokens)  # (W, K, A, H)
    new_bias = torch.zeros(n_windows, per_window, ahead, dtype=dtype, device=device)
    starts = starts + cache.offset  # positions from here on
    new_positions = fed + cache.offset
    n_latents = 0
    if expert is not None and expert.has_coprocessor:
        n_latents = expert.latent_head.gate.numel()
        latent_positions = starts[:, :, None].expand(-1, -1, n_latents)  # (W, K, L)
        blocks = torch.arange(per_window, device=device).repeat_interleave(n_latents)  # (K * L,)
        soft_mask = block_attention_bias(
            key_bias.repeat_interleave(n_latents, dim=1),  # (W, K * L, N_P + T)
            blocks,
            torch.zeros(n_windows, per_window * n_latents, dtype=dtype, device=device),
        )
        z = expert.encode(
            past, soft_mask, latent_positions.reshape(n_windows, -1), copies=per_window
        ).to(dtype)
        z = z.view(n_windows, per_window, n_latents, -1)  # (W, K, L, H)
        inputs = torch.cat([z, inputs], dim=2)  # (W, K, L + A, H)
        gate = expert.gate_bias(n_windows).to(dtype)[:, None, :].expand(-1, per_window, -1)
        new_bias = torch.cat([gate, new_bias], dim=2)  # (W, K, L + A)
        new_positions = torch.cat([latent_positions, new_positions], dim=2)  # (W, K, L + A)
    block = n_latents + ahead
    blocks = torch.arange(per_window, device=device).repeat_interleave(block)  # (K * block,)
    mask = block_attention_bias(
        key_bias.repeat_interleave(block, dim=1), blocks, new_bias.reshape(n_windows, -1)
    )  # (W, 1, K * block, N_P + T + K * block)
    hidden = forward_with_mask(
        decoder,
        cache=as_cache(past),
        mask=mask,
        inputs_embeds=inputs.reshape(n_windows, per_window * block, -1),  # (W, K * block, H)
        positions=new_positions.reshape(n_windows, -1),  # (W, K * block)
    )
    hidden = hidden.view(n_windows, per_window, block, -1)[:, :, n_latents:]  # (W, K, A, H)
    logits = decoder.get_output_embeddings()(hidden)  # (W, K, A, V)
    losses = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(), reduction="none")
    return losses.view(n_windows, per_window, ahead)


def _window_key_bias(visible, prefix_bias):
    """The bias of every cached key for every point: (W, K, N_P + T) from which window
    tokens each point sees (W, K, T) and the static prefix's gate (W, N_P), seen by all."""
    dtype = prefix_bias.dtype
    window = torch.where(visible, 0.0, negative(dtype)).to(dtype)
    shape = (-1, visible.shape[1], -1)
    return torch.cat([prefix_bias[:, None, :].expand(shape), window], dim=-1)


def step_losses(decoder, expert, windows, positions, ahead):
    """Every loss token of one training step, flat: the windows' own next-token losses when
    the expert has a static prefix, and the K x N_A losses after the latents when it has a
    coprocessor (both when both)."""
    prefix = expert.prefix
    # Without a prefix the windows' pass trains nothing: no graph for it.
    with torch.set_grad_enabled(torch.is_grad_enabled() and prefix is not None):
        cache = window_cache(decoder, prefix, windows)
    parts = [] if cache.losses is None else [cache.losses.flatten()]
    if expert.has_coprocessor:
        parts.append(packed_losses(decoder, expert, windows, positions, ahead, cache).flatten())
    return torch.cat(parts)


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
def own_text(decoder, config):
    """``replay_pool`` samples of D's own text, ``window`` tokens each after a start token,
    temperature 1 (seeded), end to end: (pool * (window + 1),) on the CPU."""
    start = decoder.config.bos_token_id or 0
    requests = [
        Request([start], max_new_tokens=config.window, temperature=1.0, seed=config.seed + i)
        for i in range(config.replay_pool)
    ]
    return torch.tensor([[start, *out.token_ids] for out in generate(decoder, requests)]).flatten()


def sample_windows(token_ids, config, count, generator):
    """``count`` random windows and, for each, ``positions_per_window`` distinct positions."""
    high = len(token_ids) - config.window
    if high < 0:
        raise ValueError(
            f"corpus has {len(token_ids)} tokens, fewer than one window ({config.window})"
        )
    starts = torch.randint(0, high + 1, (count,), generator=generator)
    windows = torch.stack([token_ids[s : s + config.window] for s in starts.tolist()])
    choices = config.window - config.ahead_tokens - config.min_prefix + 1
    if choices < config.positions_per_window:
        raise ValueError("window too short for min_prefix + ahead_tokens and the positions")
    picks = torch.stack(
        [
            torch.randperm(choices, generator=generator)[: config.positions_per_window]
            for _ in range(count)
        ]
    )
    return windows, picks + config.min_prefix


def ahead_losses(logits, targets):
    """Per-row, per-ahead-position negative log-likelihood: (R, A)."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


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
    should_stop=None,
    checkpoint_path=None,
    on_checkpoint=None,
    resume_from=None,
    autocast_dtype=None,
):
    """Train an expert on ``token_ids`` (1-D LongTensor) with D frozen.

    on_progress(Progress) is called every step; should_stop() is read between steps and ends
    the run with Cancelled; every checkpoint_every steps the full state goes to
    checkpoint_path and on_checkpoint(path) is called. resume_from continues a run exactly.
    bf16 autocast on CUDA by default, fp32 on CPU.
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
    token_ids = token_ids.to(device)
    step, elapsed, history = 0, 0.0, []
    if resume_from is not None:
        step, elapsed, history = load_checkpoint(resume_from, expert, optimizer, generator)
    elif expert.prefix is not None:
        expert.prefix.initialize_from(decoder, prefix_text(token_ids, config, generator))
    replay_ids = None
    if config.replay_windows:
        # Regenerated on resume (seeded, so the same); its time counts once, in a fresh run.
        started = time.perf_counter()
        replay_ids = own_text(decoder, config)
        if resume_from is None:
            elapsed += time.perf_counter() - started
    stopped = "done"
    tokens_per_step = loss_tokens_per_step(config)
    while step < config.steps:
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled at step {step}")
        if config.time_budget_s and elapsed >= config.time_budget_s:
            stopped = "time"
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
        )
        step += 1
        took = time.perf_counter() - started
        elapsed += took
        history.append((step, round(elapsed, 3), loss))
        if on_progress is not None:
            on_progress(_progress(config, step, loss, elapsed, took, tokens_per_step))
        if checkpoint_path and config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(
                checkpoint_path, expert, optimizer, generator, step, elapsed, history, config
            )
            if on_checkpoint is not None:
                on_checkpoint(checkpoint_path)
    expert.eval()
    return TrainResult(expert=expert, steps=step, stopped=stopped, history=history)


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
    decoder, expert, token_ids, config, optimizer, generator, device, autocast, replay_ids=None
):
    """One optimiser step over ``config.grad_accum`` sampled batches; returns the mean loss.
    ``replay_ids``: D's own text (``own_text``) to add ``config.replay_windows`` windows of."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(config.grad_accum):
        windows, positions = sample_windows(
            token_ids.cpu(), config, config.windows_per_step, generator
        )
        if replay_ids is not None:
            extra = sample_windows(replay_ids, config, config.replay_windows, generator)
            windows = torch.cat([windows, extra[0]])
            positions = torch.cat([positions, extra[1]])
        windows, positions = windows.to(device), positions.to(device)
        with torch.autocast(
            device.type, dtype=autocast or torch.float32, enabled=autocast is not None
        ):
            losses = step_losses(decoder, expert, windows, positions, config.ahead_tokens)
            loss = losses.mean() / config.grad_accum
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(expert.parameters(), config.max_grad_norm)
    optimizer.step()
    return total


def _progress(config, step, loss, elapsed, took, tokens_per_step):
    if config.time_budget_s:
        total = max(step, int(step * config.time_budget_s / max(elapsed, 1e-9)))
        total = min(total, config.steps)
        eta = max(0.0, min(config.time_budget_s - elapsed, (config.steps - step) * took))
    else:
        total = config.steps
        eta = (config.steps - step) * (elapsed / step)
    return Progress(
        step=step,
        total=total,
        loss=loss,
        tokens_per_s=tokens_per_step / took,
        eta_s=eta,
        elapsed_s=elapsed,
    )


def save_checkpoint(path, expert, optimizer, generator, step, elapsed, history, config):
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
    return state["step"], state["elapsed"], history
