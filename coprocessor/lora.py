"""LoRA on the shared decoder through forward hooks, per batch row, without mutating it.

Every linear layer of D's blocks gets one forward hook (``install_lora_hooks``). The hook does
nothing unless adapters are active in the current context (a ContextVar), so concurrent
callers and plain passes through the same decoder see plain D. Active adapters map a module to
a list of ``RowLoRA``: the rows of the batch they apply to, and A (r, in) / B (out, r) shared
by those rows or stacked per row. One expert for the whole batch (training), experts of one
shape stacked for one bmm, and experts of different shapes each on their own rows are all
lists of that one kind.
"""

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import artifact

# (adapters by id(module), tail) while LoRA is active in this context, else None.
_ACTIVE = contextvars.ContextVar("latentry_active_lora", default=None)


def linear_layers(decoder):
    """(name, module) of every linear layer inside the decoder blocks."""
    for name, module in decoder.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and artifact.LAYER_INDEX.search(f".{name}"):
            yield name, module


def in_out_features(module):
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # transformers' Conv1D is [in, out]


def install_lora_hooks(decoder):
    """Hook every linear layer once; the hooks do nothing unless adapters are active."""
    if getattr(decoder, "_latentry_hooked", False):
        return
    for _, module in linear_layers(decoder):
        module.register_forward_hook(_lora_hook)
    decoder._latentry_hooked = True


@dataclass
class RowLoRA:
    """One module's LoRA for some rows of a batch: ``output[rows] += x[rows] @ A^T @ B^T * scale``.

    ``a``/``b`` are one (r, in) / (out, r) pair for all the rows, or one pair per row, stacked
    only when the hook runs: copied just before the bmm reads them they are still in the CPU's
    cache (16 experts' stacks for every module at once are ~300 MB, written out and read back
    from memory). ``scale`` is a float, or (R,) per row.
    """

    rows: slice | torch.Tensor
    a: torch.Tensor | list[torch.Tensor]
    b: torch.Tensor | list[torch.Tensor]
    scale: float | torch.Tensor

    def delta(self, x):
        """x: (R, T, in) -> (R, T, out)."""
        a, b, scale = self.a, self.b, self.scale
        if isinstance(a, list):
            a, b = torch.stack(a), torch.stack(b)  # (R, r, in), (R, out, r)
            scale = scale[:, None, None]
        return (x.to(a.dtype) @ a.mT @ b.mT) * scale


def _lora_hook(module, args, output):
    active = _ACTIVE.get()
    if not active:
        return None
    adapters, tail = active
    row_loras = adapters.get(id(module))
    if row_loras is None:
        return None
    columns = slice(None) if tail is None else slice(-tail, None)
    x = args[0][:, columns]  # (B, T or tail, in)
    if torch.is_grad_enabled():
        output = output.clone()  # autograd needs the linear's own output unchanged
    for lora in row_loras:
        output[lora.rows, columns] += lora.delta(x[lora.rows]).to(output.dtype)
    return output


@contextlib.contextmanager
def activate(adapters, tail=None):
    """Within this block (and this context only), D's hooked layers add ``adapters``:
    {id(module): [RowLoRA, ...]}. With ``tail``, only each row's last ``tail`` positions get
    deltas (soft tokens packed after a prompt in one pass); the positions before see plain D."""
    token = _ACTIVE.set((adapters, tail))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def row_adapters(experts_by_row, tail=None):
    """A context in which row i of a batch through D carries the LoRA of experts_by_row[i].

    Different LoRA experts then share one forward of D, each adding its delta on its own rows;
    rows whose expert is None stay plain and read no expert's weights. See ``activate`` for
    ``tail``.
    """
    rows_of = {}  # id(expert) -> (expert, its rows)
    for row, expert in enumerate(experts_by_row):
        if expert is not None:
            rows_of.setdefault(id(expert), (expert, []))[1].append(row)
    experts = [expert for expert, _ in rows_of.values()]
    if _same_shape(experts):
        rows = [row for row, e in enumerate(experts_by_row) if e is not None]
        return activate(_stacked(experts_by_row, rows), tail)
    return activate(_grouped(rows_of.values()), tail)


def _same_shape(experts):
    first = experts[0]
    return all(
        e.config.lora_rank == first.config.lora_rank and e.lora_names == first.lora_names
        for e in experts
    )


def _stacked(experts_by_row, rows):
    """Experts of one shape: per module, their rows' weights stacked for one bmm."""
    experts = [experts_by_row[row] for row in rows]
    first = experts[0]
    scale = torch.tensor(
        [e.lora_scale for e in experts], dtype=first.lora_a[0].dtype, device=_device(first)
    )
    index = _row_index(rows, _device(first))
    return {
        id(module): [
            RowLoRA(
                index,
                [e.lora_a[i] for e in experts],
                [e.lora_b[i] for e in experts],
                scale,
            )
        ]
        for i, module in enumerate(first.lora_layers)
    }


def _grouped(experts_with_rows):
    """Experts of different shapes: per module, each expert's delta on its own rows."""
    adapters = {}
    for expert, rows in experts_with_rows:
        index = _row_index(rows, _device(expert))
        for module, a, b in zip(expert.lora_layers, expert.lora_a, expert.lora_b, strict=True):
            adapters.setdefault(id(module), []).append(RowLoRA(index, a, b, expert.lora_scale))
    return adapters


def _row_index(rows, device):
    """A slice for contiguous rows (a view), else an index tensor (a copy)."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


def _device(expert):
    return expert.soft_tokens.device
