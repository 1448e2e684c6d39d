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

import torch
import torch.nn.functional as F

from .decoder import as_cache, block_attention_bias, embed, forward_with_mask, negative, prefill
from .expert import Coprocessor, CoprocessorConfig


@dataclass
class TrainConfig:
    # The expert. 4 latents (CoprocessorConfig's default) and 16 points per window: better
    # held-out perplexity in a fixed CPU budget than 8 and 8, and twice the loss tokens per
    # step (bench/quality.py, train_speed.py).
    expert: CoprocessorConfig = field(default_factory=CoprocessorConfig)
    # The objective.
    ahead_tokens: int = 16  # N_A: tokens after the augmentation point that carry the loss
    window: int = 256  # tokens of context per sampled window
    positions_per_window: int = 16  # augmentation points trained from one prefix pass
    windows_per_step: int = 1
    min_prefix: int = 16  # never augment before this many tokens of context
    # The optimisation.
    steps: int = 200  # total steps; with a time budget, an upper bound
    time_budget_s: float = 0.0  # > 0: stop after this much training time, decay by time
    lr: float = 1e-3
    gate_lr: float = 5e-2  # the gate is one scalar per latent; Adam moves it ~gate_lr a step
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


@dataclass
class TrainResult:
    expert: Coprocessor
    steps: int
    stopped: str  # "done", "time", "cancelled"
    history: list = field(default_factory=list)  # (step, elapsed_s, loss)


class Cancelled(Exception):
    pass


def position_batch(decoder, windows, positions, ahead):
    """Rows for the augmented forward: one per (window, position).

    windows: (W, T) token ids; positions: (W, K) indices p of the first target token.
    Returns past, past_bias, tokens (R, ahead), targets (R, ahead), start positions (R,).
    """
    n_windows, length = windows.shape
    per_window = positions.shape[1]
    with torch.no_grad():
        past = prefill(decoder, windows, torch.ones_like(windows, dtype=torch.bool)).past
    rows = torch.arange(n_windows, device=windows.device).repeat_interleave(per_window)  # (R,)
    past = [(k[rows], v[rows]) for k, v in past]  # (R, kv_heads, T, head_dim)
    p = positions.reshape(-1)  # (R,) with R = W * K
    dtype = past[0][0].dtype
    keys = torch.arange(length, device=windows.device)
    past_bias = torch.where(keys[None, :] < (p - 1)[:, None], 0.0, negative(dtype)).to(dtype)
    # (R, T): each row sees x[:p-1]
    offsets = torch.arange(ahead, device=windows.device)
    fed = (p - 1)[:, None] + offsets  # (R, A): x[p-1 : p-1+ahead]
    tokens = windows[rows[:, None], fed]
    targets = windows[rows[:, None], fed + 1]
    return past, past_bias, tokens, targets, p - 1


def packed_losses(decoder, expert, windows, positions, ahead):
    """Per-token losses (W, K, A) for K augmentation points per window, packed in one row.

    Each window's cache is computed once and shared: the K blocks of soft tokens (C pass) and
    of [latents, tokens] (D pass) sit side by side after it, each block seeing only its own
    prefix ``x[:p-1]`` and itself. Equal to one row per point (``position_batch``), without
    copying the cache K times. ``expert=None`` gives the plain decoder's losses.
    """
    n_windows, length = windows.shape
    per_window = positions.shape[1]
    device = windows.device
    with torch.no_grad():
        past = prefill(decoder, windows, torch.ones_like(windows, dtype=torch.bool)).past
    dtype = past[0][0].dtype
    starts = positions - 1  # (W, K) position of x[p-1], the first fed token
    visible = torch.arange(length, device=device)[None, None, :] < starts[:, :, None]  # (W, K, T)
    offsets = torch.arange(ahead, device=device)
    fed = starts[:, :, None] + offsets  # (W, K, A)
    rows = torch.arange(n_windows, device=device)[:, None, None]
    tokens, targets = windows[rows, fed], windows[rows, fed + 1]
    inputs = embed(decoder, tokens)  # (W, K, A, H)
    new_bias = torch.zeros(n_windows, per_window, ahead, dtype=dtype, device=device)
    new_positions = fed
    n_latents = 0
    if expert is not None:
        n_latents = expert.latent_head.gate.numel()
        latent_positions = starts[:, :, None].expand(-1, -1, n_latents)  # (W, K, L)
        blocks = torch.arange(per_window, device=device).repeat_interleave(n_latents)  # (K * L,)
        soft_mask = block_attention_bias(
            visible.repeat_interleave(n_latents, dim=1),  # (W, K * L, T)
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
        new_positions = torch.cat([latent_positions, fed], dim=2)  # (W, K, L + A)
    block = n_latents + ahead
    blocks = torch.arange(per_window, device=device).repeat_interleave(block)  # (K * block,)
    mask = block_attention_bias(
        visible.repeat_interleave(block, dim=1), blocks, new_bias.reshape(n_windows, -1)
    )  # (W, 1, K * block, T + K * block)
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
    gate = [expert.latent_head.gate]
    rest = [p for p in expert.parameters() if p is not expert.latent_head.gate]
    return torch.optim.AdamW(
        [
            {"params": rest, "lr": config.lr, "weight_decay": config.weight_decay},
            {"params": gate, "lr": config.gate_lr, "weight_decay": 0.0},
        ],
        betas=(0.9, 0.99),
    )


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
    stopped = "done"
    tokens_per_step = config.windows_per_step * config.positions_per_window * config.ahead_tokens
    while step < config.steps:
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled at step {step}")
        if config.time_budget_s and elapsed >= config.time_budget_s:
            stopped = "time"
            break
        started = time.perf_counter()
        progress = (
            elapsed / config.time_budget_s if config.time_budget_s else step / max(config.steps, 1)
        )
        for group, base_lr in zip(optimizer.param_groups, (config.lr, config.gate_lr), strict=True):
            group["lr"] = base_lr * lr_factor(config, step, progress)
        loss = train_step(
            decoder, expert, token_ids, config, optimizer, generator, device, autocast_dtype
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


def train_step(decoder, expert, token_ids, config, optimizer, generator, device, autocast):
    """One optimiser step over ``config.grad_accum`` sampled batches; returns the mean loss."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(config.grad_accum):
        windows, positions = sample_windows(
            token_ids.cpu(), config, config.windows_per_step, generator
        )
        windows, positions = windows.to(device), positions.to(device)
        with torch.autocast(
            device.type, dtype=autocast or torch.float32, enabled=autocast is not None
        ):
            losses = packed_losses(decoder, expert, windows, positions, config.ahead_tokens)
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
