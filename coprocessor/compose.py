"""Several experts on one request: their static prefixes side by side in front of the row.

A composition of experts A, B, ... is one static prefix: A's positions, then B's, each behind
its own gate, and the prompt after all of them. Each part's keys keep the rotary positions
they were trained at; the prompt reads them from farther away (relative positions), exactly as
when a part is trained beside another prefix (``TrainConfig.coexist``), so serving a
composition is serving one longer prefix: no extra pass, and one decode step batches rows with
different compositions, single experts and none.

Every expert's first ``frozen`` positions are its attention sink (``coprocessor.prefix``): D's
cache over the first token of some text, where attention with nowhere better to go rests. Two
sinks side by side take twice that share of attention from everything else, so a composition
keeps the first part's sink and drops the others' (``shared_sink``); ``shared_sink=False`` is
naive concatenation, which bench/compose.py measures against it.

Only static prefixes compose: a coprocessor's latents are made from the row by its own LoRA
deltas on D, and two sets of deltas on one row are not defined.
"""

from dataclasses import dataclass
from functools import cached_property

import torch

from .expert import PREFIX_KIND


class CannotCompose(ValueError):
    """These experts cannot be served together; the message says why."""


class ComposedPrefix:
    """The prefixes of several experts as one: what ``batch_prefixes`` and ``window_cache``
    read (keys, values, gate, n_positions). The concatenated tensors are made once per
    composition, keeping the autograd graph (a coexistence step trains through them)."""

    def __init__(self, prefixes, shared_sink=True):
        first, *rest = prefixes
        # (prefix, its first position kept): later parts lose their sink when it is shared
        self.pieces = [(first, 0)] + [(p, p.frozen if shared_sink else 0) for p in rest]
        self.frozen = first.frozen

    @property
    def n_positions(self):
        return sum(prefix.n_positions - start for prefix, start in self.pieces)

    @cached_property
    def keys(self):  # (layers, kv_heads, P, head_dim)
        return torch.cat([prefix.keys[:, :, start:] for prefix, start in self.pieces], dim=2)

    @cached_property
    def values(self):
        return torch.cat([prefix.values[:, :, start:] for prefix, start in self.pieces], dim=2)

    @cached_property
    def gate(self):  # (P,)
        return torch.cat([prefix.gate[start:] for prefix, start in self.pieces])


@dataclass(frozen=True)
class ComposedConfig:
    """What the engine and the service read of an expert's config, for a composition."""

    prefix_positions: int
    n_latents: int = 0
    kind: str = PREFIX_KIND


class Composition:
    """Experts served together as one static prefix. Holds the parts (as the expert cache
    does: each once) and builds the joined prefix when a request is planned."""

    has_coprocessor = False

    def __init__(self, experts, names=None, shared_sink=True):
        names = names or [f"expert {i + 1}" for i in range(len(experts))]
        if len(experts) < 2:
            raise CannotCompose("a composition needs at least two experts")
        for expert, name in zip(experts, names, strict=True):
            if expert.has_coprocessor:
                raise CannotCompose(
                    f"{name} has a coprocessor ({expert.config.n_latents} latents, kind "
                    f"{expert.config.kind!r}): only static prefixes compose"
                )
            if expert.prefix is None:
                raise CannotCompose(f"{name} has no static prefix to compose")
        self.parts = tuple(experts)
        self.prefix = ComposedPrefix([e.prefix for e in experts], shared_sink)
        self.config = ComposedConfig(prefix_positions=self.prefix.n_positions)
