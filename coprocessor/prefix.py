"""The static part of an expert: a learned key/value prefix for every layer of the decoder.

Prefix tuning (Li & Liang, 2021) stored as the cache itself, as "Cartridges" (arXiv
2506.06266) and PEFT's ``CartridgeConfig`` do: ``n_positions`` keys and values per layer that go
into an augmented request's cache before its prompt. The prompt then takes positions from
``n_positions`` on, as it would after that many cached tokens (PEFT's convention, so an exported
prefix loads as a PEFT cartridge); rotary attention depends on distances only, so a hidden
prefix leaves the prompt's own attention unchanged.

Two choices from the Cartridges paper and our own measurements (docs/method.md):

- It starts as D's own keys and values over real text of the corpus
  (``initialize_from``): a random prefix stood at perplexity 1538 after one step.
- The first ``frozen`` positions (PEFT's ``num_frozen_tokens``) are the init text's attention
  sink: never trained and always visible. Every query's attention to each other position j
  gets a learned additive bias (``gate[j]``), as the latents' gate, closed at first: an
  untrained prefix is then the sink alone. Gating the sink too is what fails: a half-hidden
  sink splits the attention the model dumps on its first token (measured: a uniform gate of
  -4 raised perplexity 16%, hiding the sink alone with the rest open 144%).

A request pays for it with ``n_positions`` more cached keys to attend to; no extra pass.
"""

from typing import NamedTuple

import torch
from torch import nn

from .base_models import cache_shape
from .decoder import negative, prefill


class PrefixBatch(NamedTuple):
    """Each row's prefix, ready to put in front of its prompt in one batch."""

    past: list  # one (keys, values) pair per layer, each (B, kv_heads, P, head_dim)
    bias: torch.Tensor  # (B, P) the gate on each column; ``negative`` where a row has none
    offsets: torch.Tensor  # (B,) prefix length of each row: the position its prompt starts at


class KVPrefix(nn.Module):
    def __init__(self, decoder_config, n_positions, gate_init=0.0, frozen=1):
        super().__init__()
        layers, kv_heads, head_dim = cache_shape(decoder_config)
        self.keys = nn.Parameter(torch.zeros(layers, kv_heads, n_positions, head_dim))
        self.values = nn.Parameter(torch.zeros(layers, kv_heads, n_positions, head_dim))
        self.frozen = min(frozen, n_positions)
        gate = torch.full((n_positions,), float(gate_init))
        gate[: self.frozen] = 0.0  # the sink stays visible
        self.gate = nn.Parameter(gate)
        if self.frozen:
            for tensor in (self.keys, self.values, self.gate):
                tensor.register_hook(self._zero_frozen)

    @property
    def n_positions(self):
        return self.gate.numel()

    def _zero_frozen(self, grad):
        """No gradient for the sink (positions are dim 2 of keys and values, 0 of the gate)."""
        grad = grad.clone()
        if grad.dim() == 1:
            grad[: self.frozen] = 0
        else:
            grad[:, :, : self.frozen] = 0
        return grad

    @torch.no_grad()
    def initialize_from(self, decoder, token_ids):
        """Keys and values of D over the first ``n_positions`` of ``token_ids`` (1-D)."""
        ids = token_ids[: self.n_positions].to(self.keys.device)[None]  # (1, P)
        if ids.shape[1] < self.n_positions:
            raise ValueError(
                f"the text has {ids.shape[1]} tokens, fewer than the prefix ({self.n_positions})"
            )
        past = prefill(decoder, ids, torch.ones_like(ids, dtype=torch.bool)).past
        self.keys.copy_(torch.stack([k[0] for k, _ in past]))  # (layers, kv_heads, P, head_dim)
        self.values.copy_(torch.stack([v[0] for _, v in past]))


def batch_prefixes(prefixes_by_row, dtype, device):
    """One PrefixBatch for rows that each carry a prefix or None, padded to the longest with
    hidden columns; None when no row has one. A row without a prefix reads zeros behind a
    ``negative`` bias, never another expert's keys. The copies keep the autograd graph, so
    training batches its one prefix this way too."""
    width = max((p.n_positions for p in prefixes_by_row if p is not None), default=0)
    if not width:
        return None
    first = next(p for p in prefixes_by_row if p is not None)
    layers, kv_heads, _, head_dim = first.keys.shape
    batch = len(prefixes_by_row)
    keys = torch.zeros(layers, batch, kv_heads, width, head_dim, dtype=dtype, device=device)
    values = torch.zeros_like(keys)
    bias = torch.full((batch, width), negative(dtype), dtype=dtype, device=device)
    offsets = torch.zeros(batch, dtype=torch.long, device=device)
    for row, prefix in enumerate(prefixes_by_row):
        if prefix is not None:
            count = prefix.n_positions
            keys[:, row, :, :count] = prefix.keys.to(dtype)
            values[:, row, :, :count] = prefix.values.to(dtype)
            bias[row, :count] = prefix.gate.to(dtype)
            offsets[row] = count
    return PrefixBatch(list(zip(keys, values, strict=True)), bias, offsets)
