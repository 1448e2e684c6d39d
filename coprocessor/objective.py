"""The losses an expert trains on, and that measure it, over windows of a corpus.

A static prefix learns from every token of its windows: the next-token loss, or the KL to D
reading the text just before the window (context distillation, ``distill_losses``). A
coprocessor learns from the ``ahead`` tokens after its latents at K points per window, packed
after one shared cache (``packed_losses``). ``train`` optimises these; ``coprocessor.watch``
and ``coprocessor.evaluate`` measure with them.
"""

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
)
from .expert import after_latents
from .prefix import batch_prefixes


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
    logits: torch.Tensor | None  # (W, T - 1, V) over each window's next tokens, with a prefix
    losses: torch.Tensor | None  # (W, T - 1) their next-token losses


def window_cache(decoder, prefix, windows):
    """D over whole windows (W, T), after the static prefix when there is one.

    Without a prefix, the plain cache (callers run it without gradient). With one, the
    windows read it, so the pass carries the gradient to it and also gives the windows' own
    next-token logits and losses: the prefix's objective, as a fine-tune's, on every token.
    """
    visible = torch.ones_like(windows, dtype=torch.bool)
    if prefix is None:
        prefilled = prefill(decoder, windows, visible)
        return WindowCache(prefilled.past, prefilled.past_bias[:, :0], 0, None, None)
    dtype = next(decoder.parameters()).dtype
    batch = batch_prefixes([prefix] * windows.shape[0], dtype, windows.device)
    prefilled = prefill(decoder, windows, visible, prefix=batch)  # serving's pass, the same
    logits = decoder.get_output_embeddings()(prefilled.hidden[:, :-1])  # (W, T - 1, V)
    losses = F.cross_entropy(logits.float().transpose(1, 2), windows[:, 1:], reduction="none")
    return WindowCache(prefilled.past, batch.bias, prefix.n_positions, logits, losses)


def teacher_log_probs(decoder, contexts, windows):
    """The teacher of context distillation: D's log-probabilities (W, T - 1, V) for each
    window's next tokens when it has read ``contexts`` (W, C), the text just before."""
    with torch.no_grad():
        logits = decoder(
            input_ids=torch.cat([contexts, windows], dim=1),
            use_cache=False,
            logits_to_keep=windows.shape[1],
        ).logits[:, :-1]
        return logits.float().log_softmax(-1)


def distill_losses(decoder, cache, contexts, windows):
    """Per-token KL(teacher || student) (W, T - 1): the student is D with the expert's prefix
    and without the context (``cache`` from ``window_cache``)."""
    teacher = teacher_log_probs(decoder, contexts, windows)
    student = cache.logits.float().log_softmax(-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)


def window_losses(decoder, cache, windows, objective, contexts=None):
    """The windows' per-token losses (W, T - 1) under ``objective`` (TrainConfig.objective)."""
    if objective == "next_token":
        return cache.losses
    if contexts is None:
        raise ValueError(f"the {objective} objective needs the text before each window")
    kl = distill_losses(decoder, cache, contexts, windows)
    return kl if objective == "distill" else (cache.losses + kl) / 2


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
        gate = expert.gate_bias(n_windows)[:, None, :].expand(-1, per_window, -1)  # (W, K, L)
        inputs, new_bias, new_positions = after_latents(
            z, gate, inputs, new_bias, new_positions, starts
        )  # (W, K, L + A, ...)
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


def step_losses(
    decoder,
    expert,
    windows,
    positions,
    ahead,
    objective="next_token",
    contexts=None,
    prefix=None,
):
    """Every loss token of one training step, flat: the windows' own losses (``objective``;
    ``contexts`` (W, C): the text before each window, for distillation) when the expert has a
    static prefix, and the K x N_A losses after the latents when it has a coprocessor (both
    when both). ``prefix``: what the windows read instead of the expert's own prefix (a
    composition with it, ``coprocessor.compose``)."""
    prefix = prefix if prefix is not None else expert.prefix
    # Without a prefix the windows' pass trains nothing: no graph for it.
    with torch.set_grad_enabled(torch.is_grad_enabled() and prefix is not None):
        cache = window_cache(decoder, prefix, windows)
    parts = []
    if prefix is not None:
        parts.append(window_losses(decoder, cache, windows, objective, contexts).flatten())
    if expert.has_coprocessor:
        parts.append(packed_losses(decoder, expert, windows, positions, ahead, cache).flatten())
    return torch.cat(parts)


def ahead_losses(logits, targets):
    """Per-row, per-ahead-position negative log-likelihood: (R, A)."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
