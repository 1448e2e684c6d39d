"""The coprocessor: soft tokens in, latents out, written into the frozen decoder's cache.

The frozen decoder D reads a prefix and holds its kv-cache. The coprocessor C (D's own weights
plus LoRA deltas, or a trainable full copy) reads that cache as its past together with
``n_latents`` soft tokens; a small latent head maps C's last hidden states to the latents z. D
then continues from its cache over z and decodes as usual.

Two choices make small-budget training work (see NOTES-method.md):

- The latents go *before the last prompt token*, and all of them take that token's position: D
  prefills ``x[:-1]``, reads z, then the last token, so the query that predicts the next token is
  a real token and real tokens keep their positions exactly.
- An untrained expert is nearly invisible: z starts as fixed anchor embeddings (the projection
  is zero-initialised) and every query's attention to a latent gets a learned bias (the gate)
  that starts very negative. Training opens the gate as the latents become useful.

D is never mutated: LoRA is applied by forward hooks that act only while a coprocessor pass is
running in the current context (a ContextVar), so concurrent callers and plain passes through
the same decoder see plain D.
"""

import contextlib
import contextvars
import copy
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from . import artifact

_ACTIVE_LORA = contextvars.ContextVar("latentry_active_lora", default=None)


@dataclass
class CoprocessorConfig:
    n_latents: int = 4
    kind: str = "lora"  # "lora": deltas on D's weights (MBs); "full": a trainable copy of D
    lora_rank: int = 16
    lora_alpha: float = 32.0
    # Leaf names of the linear layers that get LoRA; empty means every linear layer inside the
    # decoder blocks (attention and MLP), the most capacity for the fewest extra bytes.
    lora_targets: tuple[str, ...] = ()
    # Initial attention bias on latent keys. On SmolLM2-135M with 8 latents, -4 leaves held-out
    # perplexity within 0.02% of plain D (-2: +2.3%, 0: +33%), yet the bias still gets a
    # gradient and opens as training finds a use for the latents.
    gate_init: float = -4.0
    # The latents start as this token's embedding (a space works well); None: a random token.
    anchor_token_id: int | None = None
    seed: int = 0

    def to_dict(self):
        data = asdict(self)
        data["lora_targets"] = list(self.lora_targets)
        return data


# --- attention masks and caches ---------------------------------------------------------------


def negative(dtype):
    return torch.finfo(dtype).min


def attention_bias(past_bias, new_bias):
    """The 4D additive mask for a forward over Q new positions after P cached ones.

    past_bias: [B, P] bias of every cached key column (0 visible, ``negative`` hidden, the gate
    for latents). new_bias: [B, Q] bias of each new position as a key. New positions are causal
    among themselves. Returns [B, 1, Q, P + Q]; differentiable in both biases.
    """
    batch, queries = new_bias.shape
    neg = negative(new_bias.dtype)
    causal = torch.ones(queries, queries, dtype=torch.bool, device=new_bias.device).tril()
    new = torch.where(causal, new_bias[:, None, :], torch.full_like(new_bias[:, None, :], neg))
    past = past_bias[:, None, :].expand(batch, queries, past_bias.shape[1])
    return torch.cat([past, new], dim=-1)[:, None]


def as_cache(past):
    """A fresh DynamicCache over ``past`` tensors: a forward mutates the cache it is given."""
    if past is None:
        return DynamicCache()
    return DynamicCache(ddp_cache_data=[(k, v) for k, v in past])


def cache_tensors(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def past_length(past):
    return 0 if not past else past[0][0].shape[-2]


def select_rows(past, rows):
    return [(k[rows], v[rows]) for k, v in past]


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


def forward_with_mask(decoder, *, cache, mask, inputs_embeds, positions):
    """D's last hidden states over new positions, with a ready 4D mask; ``cache`` is mutated."""
    out = decoder.base_model(
        inputs_embeds=inputs_embeds,
        past_key_values=cache,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
    )
    return out.last_hidden_state


def block_attention_bias(past_visible, blocks, new_bias):
    """The 4D mask for several independent blocks packed after one cache: [B, 1, Q, P + Q].

    past_visible: [B, Q, P] which cached keys each new position may see; blocks: [Q] block id of
    each new position (a position sees the earlier positions of its own block only); new_bias:
    [B, Q] bias of each new position as a key (the gate for latents). Packing K augmentation
    points of one window this way shares the window's cache instead of copying it K times.
    """
    neg = negative(new_bias.dtype)
    past = torch.where(past_visible, 0.0, neg).to(new_bias.dtype)
    queries = blocks.shape[0]
    causal = torch.ones(queries, queries, dtype=torch.bool, device=blocks.device).tril()
    allowed = causal & (blocks[:, None] == blocks[None, :])
    new = torch.where(allowed, new_bias[:, None, :], torch.full_like(new_bias[:, None, :], neg))
    return torch.cat([past, new], dim=-1)[:, None]


def embed(decoder, token_ids):
    return decoder.get_input_embeddings()(token_ids)


# --- LoRA through hooks -----------------------------------------------------------------------


def linear_layers(decoder):
    """(name, module) of every linear layer inside the decoder blocks."""
    from transformers.pytorch_utils import Conv1D

    for name, module in decoder.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and artifact.LAYER_INDEX.search(f".{name}"):
            yield name, module


def in_out_features(module):
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # transformers' Conv1D is [in, out]


def _lora_hook(module, args, output):
    active = _ACTIVE_LORA.get()
    if not active:
        return None
    adapters, tail = active
    adapter = adapters.get(id(module))
    if adapter is None:
        return None
    x = args[0] if tail is None else args[0][:, -tail:]
    if isinstance(adapter, list):  # per-row experts of different shapes: [(rows, A, B, scale)]
        deltas = [
            (rows, (x[rows].to(a.dtype) @ a.t() @ b.t()) * scale) for rows, a, b, scale in adapter
        ]
    elif isinstance(adapter, RowStack):  # one (A, B) per row, stacked here: bmm
        lora_a, lora_b, scale = adapter.stacked()
        delta = torch.bmm(torch.bmm(x.to(lora_a.dtype), lora_a.transpose(1, 2)), lora_b.mT)
        deltas = [(slice(None), delta * scale[:, None, None])]
    else:
        lora_a, lora_b, scale = adapter
        deltas = [(slice(None), (x.to(lora_a.dtype) @ lora_a.t() @ lora_b.t()) * scale)]
    if torch.is_grad_enabled():
        output = output.clone()  # autograd needs the linear's own output unchanged
    columns = slice(None) if tail is None else slice(-tail, None)
    for rows, delta in deltas:
        output[rows, columns] += delta.to(output.dtype)
    return output


@contextlib.contextmanager
def row_adapters(experts_by_row, tail=None):
    """Within this block, row i of a batch through D carries the LoRA of experts_by_row[i].

    Different LoRA experts then share one forward of D (each adds its delta on its own rows),
    instead of one forward per expert. Rows whose expert is None stay plain. With ``tail``,
    the deltas apply to each row's last ``tail`` positions only (soft tokens packed after a
    prompt in one pass); the positions before it see plain D.
    """
    experts = [e for e in experts_by_row if e is not None]
    if _same_shape(experts):
        adapters = _stacked_adapters(experts_by_row, experts[0])
    else:
        adapters = _grouped_adapters(experts_by_row)
    token = _ACTIVE_LORA.set((adapters, tail))
    try:
        yield
    finally:
        _ACTIVE_LORA.reset(token)


def _same_shape(experts):
    first = experts[0]
    return all(
        e.config.lora_rank == first.config.lora_rank and e.lora_names == first.lora_names
        for e in experts
    )


def _stacked_adapters(experts_by_row, first):
    """Experts of one shape: each module gets [B, r, in] / [B, out, r] stacks, one bmm.

    A plain row borrows ``first``'s weights with a scale of 0, so its delta is exactly 0.
    """
    donors = [first if e is None else e for e in experts_by_row]
    scale = torch.tensor(
        [0.0 if e is None else e.lora_scale for e in experts_by_row],
        dtype=first.lora_a[0].dtype,
        device=first.soft_tokens.device,
    )
    return {
        id(module): RowStack(donors, index, scale)
        for index, module in enumerate(first._modules_by_index)
    }


@dataclass
class RowStack:
    """One module's LoRA weights of every row, stacked when its hook runs: copied just before
    the bmm reads them, they are still in the CPU's cache (all 16 experts' stacks at once are
    ~300 MB, copied and then read back from memory)."""

    donors: list
    index: int
    scale: torch.Tensor

    def stacked(self):
        a = torch.stack([e.lora_a[self.index] for e in self.donors])
        b = torch.stack([e.lora_b[self.index] for e in self.donors])
        return a, b, self.scale


def _grouped_adapters(experts_by_row):
    """Experts of different shapes: per module, each expert's delta on its own rows."""
    rows_of = {}
    for row, expert in enumerate(experts_by_row):
        if expert is not None:
            rows_of.setdefault(id(expert), (expert, []))[1].append(row)
    adapters = {}
    for expert, rows in rows_of.values():
        contiguous = rows == list(range(rows[0], rows[-1] + 1))
        # A slice selects its rows as a view; only scattered rows need an index (a copy).
        device = expert.soft_tokens.device
        index = slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=device)
        for module, a, b in zip(
            expert._modules_by_index, expert.lora_a, expert.lora_b, strict=True
        ):
            adapters.setdefault(id(module), []).append((index, a, b, expert.lora_scale))
    return adapters


def batched_latents(decoder, experts_by_row, past, past_bias, positions):
    """Latents for a batch whose rows use different LoRA experts, in one pass through D.

    Equal to each expert's ``latents`` on its own rows. Soft tokens are padded at the end to
    the longest expert's count (causal among themselves, so the padding changes nothing before
    it). Returns (z, gate): (B, L, H) and (B, L) with ``negative`` on padding columns.
    """
    soft = _soft_tokens(decoder, experts_by_row)
    batch, width, _ = soft.shape
    new_bias = torch.zeros(batch, width, dtype=soft.dtype, device=soft.device)
    with row_adapters(experts_by_row):
        hidden = forward_with_mask(
            decoder,
            cache=as_cache(past),
            mask=attention_bias(past_bias.to(soft.dtype), new_bias),
            inputs_embeds=soft,
            positions=positions[:, None].expand(batch, width),
        )
    return _latent_heads(experts_by_row, hidden)


def prefill_with_latents(decoder, token_ids, visible, experts_by_row):
    """``prefill`` and ``batched_latents`` in one forward of D (None rows get no latents).

    Each row's soft tokens go after its prompt prefix: causal order keeps the prefix from
    seeing them, LoRA deltas act on those trailing positions only, and their keys and values
    are cut from the cache afterwards. This saves a whole pass of D per batch, which on a small
    model is mostly fixed per-layer cost. Returns (past, past_bias, next_positions, z, gate).
    """
    soft = _soft_tokens(decoder, experts_by_row)
    batch, width, _ = soft.shape
    prompt_width = token_ids.shape[1]
    bias = torch.where(visible, 0.0, negative(soft.dtype)).to(soft.dtype)
    next_positions = visible.long().sum(-1)
    positions = torch.cat(
        [
            (visible.long().cumsum(-1) - 1).clamp(min=0),
            next_positions[:, None].expand(batch, width),
        ],
        dim=1,
    )
    new_bias = torch.cat([bias, torch.zeros(batch, width, dtype=soft.dtype, device=soft.device)], 1)
    cache = DynamicCache()
    with row_adapters(experts_by_row, tail=width):
        hidden = forward_with_mask(
            decoder,
            cache=cache,
            mask=attention_bias(bias[:, :0], new_bias),
            inputs_embeds=torch.cat([embed(decoder, token_ids), soft], dim=1),
            positions=positions,
        )
    past = [(k[:, :, :prompt_width], v[:, :, :prompt_width]) for k, v in cache_tensors(cache)]
    z, gate = _latent_heads(experts_by_row, hidden[:, prompt_width:])
    return past, bias, next_positions, z, gate


def _soft_tokens(decoder, experts_by_row):
    """Each row's soft tokens, zero-padded to the longest count: (B, L, H)."""
    width = max(e.config.n_latents for e in experts_by_row if e is not None)
    weight = decoder.get_input_embeddings().weight
    soft = torch.zeros(
        len(experts_by_row), width, weight.shape[1], dtype=weight.dtype, device=weight.device
    )
    for row, expert in enumerate(experts_by_row):
        if expert is not None:
            soft[row, : expert.config.n_latents] = expert.soft_tokens.to(weight.dtype)
    return soft


def _latent_heads(experts_by_row, hidden):
    """Each row's expert head over its soft tokens' last hidden states: (z, gate)."""
    batch, width, hidden_size = hidden.shape
    z = torch.zeros(batch, width, hidden_size, dtype=torch.float32, device=hidden.device)
    gate = torch.full(
        (batch, width), negative(hidden.dtype), dtype=hidden.dtype, device=hidden.device
    )
    for row, expert in enumerate(experts_by_row):
        if expert is not None:
            count = expert.config.n_latents
            z[row, :count] = expert.latent_head(hidden[row : row + 1, :count].float())[0]
            gate[row, :count] = expert.latent_head.gate.to(hidden.dtype)
    return z, gate


def install_lora_hooks(decoder):
    """Hook every linear layer once; the hooks do nothing unless a coprocessor is active."""
    if getattr(decoder, "_latentry_hooked", False):
        return
    for _, module in linear_layers(decoder):
        module.register_forward_hook(_lora_hook)
    decoder._latentry_hooked = True


# --- the coprocessor --------------------------------------------------------------------------


class LatentHead(nn.Module):
    """z = anchors + proj(h): starts at fixed, in-distribution anchor embeddings."""

    def __init__(self, hidden, n_latents, anchor, gate_init):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.anchors = nn.Parameter(anchor.detach().clone().expand(n_latents, hidden).clone())
        self.gate = nn.Parameter(torch.full((n_latents,), float(gate_init)))

    def forward(self, hidden):  # (B, L, H) -> (B, L, H)
        return self.anchors + self.proj(hidden)


class Coprocessor(nn.Module):
    """An expert: soft tokens, the latent head, and C's trainable part (LoRA or a full copy).

    The frozen decoder is held by reference, not registered as a submodule, so that
    ``parameters()`` and ``state_dict()`` hold only the expert.
    """

    def __init__(self, decoder, config=None, anchor_token_id=None, lora_modules=None):
        """``lora_modules``: the exact linear layers to adapt (a loaded file's), instead of
        every one whose leaf name is in ``config.lora_targets``."""
        super().__init__()
        self.config = config = config or CoprocessorConfig()
        self._decoder = (decoder,)
        generator = torch.Generator().manual_seed(config.seed)
        embeddings = decoder.get_input_embeddings().weight.detach()
        hidden = embeddings.shape[1]
        # Soft tokens start as real token embeddings, so C first sees familiar inputs.
        picks = torch.randint(0, embeddings.shape[0], (config.n_latents,), generator=generator)
        self.soft_tokens = nn.Parameter(embeddings[picks].clone().float())
        if anchor_token_id is None:
            anchor_token_id = config.anchor_token_id
        anchor = embeddings[anchor_token_id if anchor_token_id is not None else picks[0]]
        self.latent_head = LatentHead(hidden, config.n_latents, anchor.float(), config.gate_init)
        self.lora_names = []
        if config.kind == "lora":
            self._init_lora(decoder, generator, lora_modules)
        elif config.kind == "full":
            self.full = copy.deepcopy(decoder)
            self.full.requires_grad_(True)
        else:
            raise ValueError(f"kind must be 'lora' or 'full', got {config.kind!r}")

    @property
    def decoder(self):
        return self._decoder[0]

    def _init_lora(self, decoder, generator, lora_modules=None):
        install_lora_hooks(decoder)
        targets = set(self.config.lora_targets)
        self.lora_a, self.lora_b = nn.ParameterList(), nn.ParameterList()
        self._modules_by_index = []
        for name, module in linear_layers(decoder):
            if lora_modules is not None and name not in lora_modules:
                continue
            if targets and name.rsplit(".", 1)[-1] not in targets:
                continue
            fan_in, fan_out = in_out_features(module)
            a = torch.empty(self.config.lora_rank, fan_in)
            # PEFT's default: kaiming-uniform A, zero B, so the delta starts at exactly zero.
            bound = 1 / math.sqrt(fan_in)
            a.uniform_(-bound, bound, generator=generator)
            self.lora_a.append(nn.Parameter(a))
            self.lora_b.append(nn.Parameter(torch.zeros(fan_out, self.config.lora_rank)))
            self.lora_names.append(name)
            self._modules_by_index.append(module)
        if not self.lora_names:
            raise ValueError(f"no linear layers match lora_targets {sorted(targets)}")

    @property
    def lora_scale(self):
        return self.config.lora_alpha / self.config.lora_rank

    @contextlib.contextmanager
    def active(self):
        """Within this block (and this context only), D's linear layers carry the LoRA deltas."""
        if self.config.kind != "lora":
            yield
            return
        adapters = {
            id(module): (a, b, self.lora_scale)
            for module, a, b in zip(self._modules_by_index, self.lora_a, self.lora_b, strict=True)
        }
        token = _ACTIVE_LORA.set((adapters, None))
        try:
            yield
        finally:
            _ACTIVE_LORA.reset(token)

    def latents(self, past, past_bias, positions):
        """Run C over the soft tokens with D's cache as its past. Returns z: (B, L, H).

        positions: (B,) the position the next real token will take; every soft token gets it.
        """
        batch = past_bias.shape[0]
        n_latents = self.config.n_latents
        dtype = self.body_dtype()
        new_bias = torch.zeros(batch, n_latents, dtype=dtype, device=past_bias.device)
        mask = attention_bias(past_bias.to(dtype), new_bias)
        return self.encode(past, mask, positions[:, None].expand(batch, n_latents), copies=1)

    def body_dtype(self):
        body = self.full if self.config.kind == "full" else self.decoder
        return next(body.parameters()).dtype

    def encode(self, past, mask, positions, copies):
        """Latents for ``copies`` blocks of soft tokens at once, under a ready 4D mask.

        positions: (B, copies * n_latents). Returns z: (B, copies * n_latents, H).
        """
        body = self.full if self.config.kind == "full" else self.decoder
        dtype = next(body.parameters()).dtype
        soft = self.soft_tokens.to(dtype).repeat(copies, 1)
        soft = soft.unsqueeze(0).expand(positions.shape[0], -1, -1)
        with self.active():
            hidden = forward_with_mask(
                body,
                cache=as_cache(past),
                mask=mask.to(dtype),
                inputs_embeds=soft,
                positions=positions,
            )
        batch, _, width = hidden.shape
        hidden = hidden.float().view(batch, copies, self.config.n_latents, width)
        return self.latent_head(hidden).reshape(batch, -1, width)

    def gate_bias(self, batch):
        return self.latent_head.gate.unsqueeze(0).expand(batch, -1)

    # --- the expert file ----------------------------------------------------------------------

    def expert_tensors(self):
        """Tensors for the expert file, LoRA under PEFT's names."""
        tensors = {"soft_tokens": self.soft_tokens.detach()}
        for name, value in self.latent_head.named_parameters():
            tensors[f"latent_head.{name}"] = value.detach()
        if self.config.kind == "lora":
            for name, a, b in zip(self.lora_names, self.lora_a, self.lora_b, strict=True):
                tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach()
                tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach()
        else:
            for name, value in self.full.state_dict().items():
                tensors[f"coprocessor.{name}"] = value.detach()
        return {k: v.float().contiguous().cpu() for k, v in tensors.items()}

    def expert_metadata(self, base_fingerprint, base_model_id="", training=None):
        config = self.config
        targets = sorted({name.rsplit(".", 1)[-1] for name in self.lora_names})
        return artifact.build_metadata(
            kind=config.kind,
            base_model_fingerprint=base_fingerprint,
            base_model_id=base_model_id,
            n_latents=config.n_latents,
            hidden_size=self.decoder.config.hidden_size,
            num_layers=self.decoder.config.num_hidden_layers,
            lora_rank=config.lora_rank if config.kind == "lora" else None,
            lora_alpha=config.lora_alpha if config.kind == "lora" else None,
            lora_target_modules=targets,
            config={"coprocessor": config.to_dict(), "training": training or {}},
        )

    def save(self, path, base_fingerprint, base_model_id="", training=None):
        artifact.save_expert(
            path,
            self.expert_tensors(),
            self.expert_metadata(base_fingerprint, base_model_id, training),
        )

    @classmethod
    def from_tensors(cls, decoder, tensors, metadata):
        """Rebuild an expert from a file's tensors and metadata (see ``artifact.load_expert``)."""
        saved = artifact._json_field(metadata, "config", default={}).get("coprocessor", {})
        saved["lora_targets"] = tuple(saved.get("lora_targets", ()))
        config = CoprocessorConfig(
            **{**saved, "n_latents": int(metadata["n_latents"]), "kind": metadata["kind"]}
        )
        lora_modules = None
        if config.kind == "lora":
            config.lora_rank = int(metadata["lora_rank"])
            config.lora_alpha = float(metadata["lora_alpha"])
            # Adapt exactly the layers the file has LoRA for: a file made elsewhere (PEFT, or
            # with other targets) need not cover every linear layer that ours would.
            lora_modules = {
                match["module"] for key in tensors if (match := artifact.LORA_NAME.match(key))
            }
        expert = cls(decoder, config, lora_modules=lora_modules)
        expert.load_expert_tensors(tensors)
        return expert

    @classmethod
    def from_bytes(cls, decoder, data, spec=None):
        """An expert from a file held in memory, validated against ``spec`` when given, on
        the decoder's device."""
        tensors, metadata = artifact.load_expert_bytes(data, spec)
        device = next(decoder.parameters()).device
        return cls.from_tensors(decoder, tensors, metadata).to(device).eval()

    def _passthrough_head(self):
        hidden = self.latent_head.proj.in_features
        return {
            "latent_head.proj.weight": torch.eye(hidden),
            "latent_head.proj.bias": torch.zeros(hidden),
            "latent_head.anchors": torch.zeros_like(self.latent_head.anchors),
            "latent_head.gate": torch.zeros_like(self.latent_head.gate),
        }

    @classmethod
    def load(cls, decoder, path):
        tensors, metadata = artifact.load_expert(path)
        return cls.from_tensors(decoder, tensors, metadata)

    def load_expert_tensors(self, tensors):
        own = self.expert_tensors()
        if not any(name in tensors for name in artifact.HEAD_TENSORS):
            # A file without our latent head (soft tokens and LoRA only, as the paper has it):
            # the latents are C's last hidden states themselves, with no gate bias.
            tensors = {**tensors, **self._passthrough_head()}
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise artifact.ArtifactError(
                f"expert tensors do not match: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            self.soft_tokens.copy_(tensors["soft_tokens"])
            for name, value in self.latent_head.named_parameters():
                value.copy_(tensors[f"latent_head.{name}"])
            if self.config.kind == "lora":
                for name, a, b in zip(self.lora_names, self.lora_a, self.lora_b, strict=True):
                    a.copy_(tensors[f"base_model.model.{name}.lora_A.weight"])
                    b.copy_(tensors[f"base_model.model.{name}.lora_B.weight"])
            else:
                state = {
                    k[len("coprocessor.") :]: v
                    for k, v in tensors.items()
                    if k.startswith("coprocessor.")
                }
                self.full.load_state_dict(state)


class SoftTokens(nn.Module):
    """The baseline without a coprocessor: N_L trainable embeddings are the latents.

    Same placement and gate as an expert (arXiv 2510.00494 found this nearly matches the
    two-model design), so the coprocessor must earn its cost against it.
    """

    def __init__(self, decoder, n_latents=8, gate_init=-4.0, anchor_token_id=None, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        embeddings = decoder.get_input_embeddings().weight.detach()
        picks = torch.randint(0, embeddings.shape[0], (n_latents,), generator=generator)
        anchor = embeddings[anchor_token_id if anchor_token_id is not None else picks[0]]
        self.latent_head = LatentHead(embeddings.shape[1], n_latents, anchor.float(), gate_init)

    def latents(self, past, past_bias, positions):
        return self.latent_head.anchors.unsqueeze(0).expand(past_bias.shape[0], -1, -1)

    def encode(self, past, mask, positions, copies):
        anchors = self.latent_head.anchors.repeat(copies, 1)
        return anchors.unsqueeze(0).expand(positions.shape[0], -1, -1)

    def gate_bias(self, batch):
        return self.latent_head.gate.unsqueeze(0).expand(batch, -1)


@dataclass
class Augmented:
    """The result of the augmented forward at one position per row."""

    logits: torch.Tensor  # (B, M, V) for the M fed tokens
    past: list = field(repr=False)  # D's cache after latents and tokens
    past_bias: torch.Tensor = field(repr=False)  # (B, P + L + M)


def augmented_forward(decoder, expert, *, past, past_bias, tokens, positions, logits_last=None):
    """D over [latents, tokens] after its cache; with ``expert=None``, over tokens alone.

    past/past_bias: D's cache of each row's prefix (all but the last prompt token, left-padded
    or masked). tokens: (B, M) the last prompt token and any following ones. positions: (B,)
    the position of tokens[:, 0]; latents share it.
    """
    batch, n_tokens = tokens.shape
    dtype = next(decoder.parameters()).dtype
    token_embeds = embed(decoder, tokens)
    token_positions = positions[:, None] + torch.arange(n_tokens, device=tokens.device)
    token_bias = torch.zeros(batch, n_tokens, dtype=dtype, device=tokens.device)
    if expert is None:
        inputs, new_bias, new_positions = token_embeds, token_bias, token_positions
    else:
        z = expert.latents(past, past_bias, positions).to(dtype)
        inputs = torch.cat([z, token_embeds], dim=1)
        gate = expert.gate_bias(batch).to(dtype)
        new_bias = torch.cat([gate, token_bias], dim=1)
        latent_positions = positions[:, None].expand(batch, z.shape[1])
        new_positions = torch.cat([latent_positions, token_positions], dim=1)
    logits, new_past = run_decoder(
        decoder,
        past=past,
        past_bias=past_bias.to(dtype),
        inputs_embeds=inputs,
        new_bias=new_bias,
        positions=new_positions,
        logits_last=logits_last or n_tokens,
    )
    return Augmented(
        logits=logits,
        past=new_past,
        past_bias=torch.cat([past_bias.to(dtype), new_bias.detach()], dim=1),
    )


def prefill(decoder, token_ids, visible):
    """D's cache over left-padded ``token_ids`` (B, T); visible marks real tokens.

    Returns (past, past_bias, next_positions) where next_positions is the position the next
    token of each row takes.
    """
    dtype = next(decoder.parameters()).dtype
    neg = negative(dtype)
    bias = torch.where(visible, 0.0, neg).to(dtype)
    positions = (visible.long().cumsum(-1) - 1).clamp(min=0)
    if token_ids.shape[1] == 0:
        return None, bias, visible.long().sum(-1)
    _, past = run_decoder(
        decoder,
        past=None,
        past_bias=bias[:, :0],
        inputs_embeds=embed(decoder, token_ids),
        new_bias=bias,
        positions=positions,
    )
    return past, bias, visible.long().sum(-1)
