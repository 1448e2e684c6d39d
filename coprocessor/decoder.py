"""Passes of the frozen decoder D over a kv-cache with explicit masks and positions.

Every pass here takes the cache as tensors (``past``: one ``(keys, values)`` pair per layer,
each ``(B, kv_heads, P, head_dim)``) and a bias per cached key column (``past_bias``: ``(B, P)``;
0 visible, ``negative`` hidden, a learned gate for latents). Rows are left-padded, so masks
and positions are always explicit: transformers' defaults derive positions from the padded
length, which is wrong for all but the longest row (docs/method.md, "Library pitfalls").
"""

import contextvars
from typing import NamedTuple

import torch
from transformers import Cache, DynamicCache, DynamicLayer

# While ``forward_with_mask`` runs in this context: the rows of each pass whose residual
# stream overflowed, else None.
_OVERFLOWS = contextvars.ContextVar("latentry_overflows", default=None)


def negative(dtype):
    """The additive bias that hides a key: the most negative finite value of ``dtype``."""
    return torch.finfo(dtype).min


def attention_bias(past_bias, new_bias):
    """The 4D additive mask for a forward over Q new positions after P cached ones.

    past_bias: (B, P) bias of every cached key column. new_bias: (B, Q) bias of each new
    position as a key. New positions are causal among themselves. Returns (B, 1, Q, P + Q);
    differentiable in both biases (the gate learns through it).
    """
    batch, queries = new_bias.shape
    neg = negative(new_bias.dtype)
    causal = torch.ones(queries, queries, dtype=torch.bool, device=new_bias.device).tril()
    new = torch.where(causal, new_bias[:, None, :], torch.full_like(new_bias[:, None, :], neg))
    past = past_bias[:, None, :].expand(batch, queries, past_bias.shape[1])  # (B, Q, P)
    return torch.cat([past, new], dim=-1)[:, None]  # (B, 1, Q, P + Q)


def block_attention_bias(past_bias, blocks, new_bias):
    """The 4D mask for several independent blocks packed after one cache: (B, 1, Q, P + Q).

    past_bias: (B, Q, P) the bias of every cached key for each new position (0 visible,
    ``negative`` hidden, a gate); blocks: (Q,) block id of each new position (a position sees
    the earlier positions of its own block only); new_bias: (B, Q) bias of each new position
    as a key (the gate for latents). Packing K augmentation points of one window this way
    shares the window's cache instead of copying it K times.
    """
    neg = negative(new_bias.dtype)
    queries = blocks.shape[0]
    causal = torch.ones(queries, queries, dtype=torch.bool, device=blocks.device).tril()
    allowed = causal & (blocks[:, None] == blocks[None, :])  # (Q, Q)
    new = torch.where(allowed, new_bias[:, None, :], torch.full_like(new_bias[:, None, :], neg))
    return torch.cat([past_bias.to(new_bias.dtype), new], dim=-1)[:, None]  # (B, 1, Q, P + Q)


def as_cache(past):
    """A fresh DynamicCache over ``past`` tensors (a forward mutates the cache it is given), or
    ``past`` itself when it already is a Cache."""
    if isinstance(past, Cache):
        return past
    if past is None:
        return DynamicCache()
    return DynamicCache(ddp_cache_data=[(k, v) for k, v in past])


class RoomyLayer(DynamicLayer):
    """One layer's cache with room for more columns after the cached ones: a decode step writes
    its column in place, where DynamicLayer copies the whole cache into a new tensor per step (at
    16 rows of 400 columns, about 300 MB of copying per step on SmolLM2). ``keys``/``values``
    are views of the filled part; past the room, the buffer doubles."""

    def __init__(self, keys, values, room):
        super().__init__()
        self.lazy_initialization(keys, values)
        batch, heads, width, dim = keys.shape
        self._keys = keys.new_empty(batch, heads, width + room, dim)
        self._values = values.new_empty(batch, values.shape[1], width + room, values.shape[3])
        self._fill(keys, values, 0)

    def update(self, key_states, value_states, *args, **kwargs):
        start = self.keys.shape[-2]
        if start + key_states.shape[-2] > self._keys.shape[-2]:
            self._grow(start + key_states.shape[-2])
        self._fill(key_states, value_states, start)
        return self.keys, self.values

    def _fill(self, keys, values, start):
        end = start + keys.shape[-2]
        self._keys[:, :, start:end] = keys
        self._values[:, :, start:end] = values
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]

    def _grow(self, needed):
        keys, values = self.keys, self.values
        capacity = max(needed, 2 * self._keys.shape[-2])
        self._keys = keys.new_empty(*keys.shape[:2], capacity, keys.shape[3])
        self._values = values.new_empty(*values.shape[:2], capacity, values.shape[3])
        self._fill(keys, values, 0)


def roomy_cache(past, room):
    """A cache over ``past`` tensors with room for ``room`` more columns per layer."""
    return Cache(layers=[RoomyLayer(k, v, room) for k, v in past])


def cache_tensors(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def select_rows(past, rows):
    return [(k[rows], v[rows]) for k, v in past]


def embed(decoder, token_ids):
    return decoder.get_input_embeddings()(token_ids)


def forward_with_mask(decoder, *, cache, mask, inputs_embeds, positions):
    """D's last hidden states over new positions, with a ready 4D mask; ``cache`` is mutated.

    A row whose residual stream overflowed comes back as NaN. What an expert writes into the
    cache can be finite and still too large for D's arithmetic: the final norm then squares
    values past float32's range and turns the row into finite nonsense (all zeros for RMSNorm,
    so greedy decoding answers token 0 forever). As NaN, every caller's finiteness check
    (serving's, evaluation's, the upload probe's) sees it.
    """
    _watch_overflow(decoder)
    overflows = []
    token = _OVERFLOWS.set(overflows)
    try:
        out = decoder.base_model(
            inputs_embeds=inputs_embeds,
            cache=cache,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
        )
    finally:
        _OVERFLOWS.reset(token)
    hidden = out.last_hidden_state
    for rows in overflows:
        hidden = hidden.masked_fill(rows[:, None, None], float("nan"))
    return hidden


def _watch_overflow(decoder):
    """Hook D's last block once: its output is what the final norm reads."""
    if getattr(decoder, "_latentry_watched", False):
        return
    blocks = [m for m in decoder.base_model.children() if isinstance(m, torch.nn.ModuleList)]
    if blocks:
        blocks[0][-1].register_forward_hook(_note_overflow)
    decoder._latentry_watched = True


def _note_overflow(module, args, output):
    """Note, per row, whether any position's mean square (what RMSNorm computes, in float32)
    left float32's range; only inside ``forward_with_mask`` (other passes are not watched)."""
    overflows = _OVERFLOWS.get()
    if overflows is None:
        return
    hidden = output[0] if isinstance(output, tuple) else output  # (B, T, H)
    with torch.no_grad():
        overflows.append(~torch.isfinite(hidden.float().square().mean(-1)).all(-1))  # (B,)


def run_decoder(decoder, *, past, past_bias, inputs_embeds, new_bias, positions, logits_last=0):
    """One forward of D over new positions; returns (hidden or logits, updated past tensors).

    logits_last > 0 computes the LM head on the last ``logits_last`` positions only (the
    vocabulary is large); 0 returns the last hidden states instead.
    """
    mask = attention_bias(past_bias, new_bias.to(inputs_embeds.dtype))
    cache = as_cache(past)
    hidden = forward_with_mask(
        decoder, cache=cache, mask=mask, inputs_embeds=inputs_embeds, positions=positions
    )
    if logits_last:
        # contiguous: on a strided slice of a batch, linear becomes a bmm over B copies of the
        # vocabulary matrix (4x slower on CPU for 16 rows) instead of one mm
        hidden = decoder.get_output_embeddings()(hidden[:, -logits_last:].contiguous())
    return hidden, cache_tensors(cache)


class Prefilled(NamedTuple):
    past: list | None  # D's cache over the static prefix and the prompts; None when empty
    past_bias: torch.Tensor  # (B, P + T)
    next_positions: torch.Tensor  # (B,) the position each row's next token takes
    # (B, T + S, H) D's last hidden states over the prompts and any soft positions; None when
    # nothing was fed
    hidden: torch.Tensor | None


def prefill(decoder, token_ids, visible, soft=None, prefix=None):
    """D's cache over left-padded ``token_ids`` (B, T); ``visible`` (B, T) marks real tokens.

    With ``prefix`` (a ``prefix.PrefixBatch``), each row's static prefix is the cache the
    prompt reads, and the prompt's positions start after it; the returned cache holds the
    prefix's columns first. With ``soft`` (B, S, H), those embeddings are packed after each
    row's prompt in the same forward, all at the position the next token takes: causal order
    keeps the prompt from seeing them, and their keys and values are cut from the cache
    afterwards. Folding the coprocessor's pass into the prefill saves a whole pass of D, which
    on a small model is mostly fixed per-layer cost. The one pass of D over new tokens after a
    static prefix: serving's prompts, training's windows (``objective.window_cache``).
    """
    dtype = next(decoder.parameters()).dtype
    batch, width = token_ids.shape
    bias = torch.where(visible, 0.0, negative(dtype)).to(dtype)  # (B, T)
    offsets = torch.zeros(batch, dtype=torch.long, device=token_ids.device)
    past, past_bias = None, bias[:, :0]
    if prefix is not None:
        past, past_bias, offsets = prefix.past, prefix.bias.to(dtype), prefix.offsets
    next_positions = offsets + visible.long().sum(-1)  # (B,)
    positions = offsets[:, None] + (visible.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    inputs = embed(decoder, token_ids)  # (B, T, H)
    new_bias = bias
    if soft is not None:
        soft = soft.to(dtype)
        n_soft = soft.shape[1]
        inputs = torch.cat([inputs, soft], dim=1)  # (B, T + S, H)
        soft_bias = torch.zeros(batch, n_soft, dtype=dtype, device=bias.device)
        new_bias = torch.cat([bias, soft_bias], dim=1)  # (B, T + S)
        soft_positions = next_positions[:, None].expand(batch, n_soft)  # (B, S)
        positions = torch.cat([positions, soft_positions], dim=1)  # (B, T + S)
    full_bias = torch.cat([past_bias, bias], dim=1)  # (B, P + T)
    if inputs.shape[1] == 0:
        return Prefilled(past, full_bias, next_positions, None)
    hidden, cache = run_decoder(
        decoder,
        past=past,
        past_bias=past_bias,
        inputs_embeds=inputs,
        new_bias=new_bias,
        positions=positions,
    )
    if soft is not None:
        kept = past_bias.shape[1] + width
        cache = [(k[:, :, :kept], v[:, :, :kept]) for k, v in cache] if kept else None
    return Prefilled(cache, full_bias, next_positions, hidden)
