"""The expert: soft tokens in, latents out, written into the frozen decoder's cache.

The frozen decoder D reads a prefix and holds its kv-cache. The coprocessor C (D's own weights
plus LoRA deltas, or a trainable full copy) reads that cache as its past together with
``n_latents`` soft tokens; a small latent head maps C's last hidden states to the latents z. D
then continues from its cache over z and decodes as usual.

Two choices make small-budget training work (docs/method.md):

- The latents go *before the last prompt token*, and all of them take that token's position: D
  prefills ``x[:-1]``, reads z, then the last token, so the query that predicts the next token is
  a real token and real tokens keep their positions exactly.
- An untrained expert is nearly invisible: z starts as fixed anchor embeddings (the projection
  is zero-initialised) and every query's attention to a latent gets a learned bias (the gate)
  that starts very negative. Training opens the gate as the latents become useful.

D is never mutated: LoRA deltas are added by hooks only while the expert is active in the
current context (``coprocessor.lora``).
"""

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import artifact, lora
from .decoder import (
    as_cache,
    attention_bias,
    embed,
    forward_with_mask,
    negative,
    prefill,
    run_decoder,
)
from .prefix import KVPrefix

# What a training job makes unless told otherwise (TrainConfig, jobs, the CLI, the demo job):
# a static prefix of 64 positions behind a closed gate, no coprocessor. At 15 CPU-minutes on the
# Python docs it cut held-out perplexity by 22% (the coprocessor of the paper: 6.6%) and cost
# about 1% on another domain's text (docs/method.md, "Static prefix recipes").
RECOMMENDED = {"n_latents": 0, "prefix_positions": 64, "prefix_gate_init": -4.0}


def prefix_positions_for(train_tokens):
    """N_P for a training text of ``train_tokens`` tokens: a larger corpus has more to learn
    before the prefix fits its own windows. 64 x (tokens / 100,000)^(1/3), in steps of 16,
    from 16 to 256: 64 on the Python docs (104,746 tokens), 128 on the Unix manual pages
    (743,551), where each was the best measured (docs/method.md, "A prefix sized to the
    data")."""
    size = 64 * (max(train_tokens, 1) / 100_000) ** (1 / 3)
    return int(min(256, max(16, 16 * round(size / 16))))


# What an expert is, one word in the config, the file, the job and the API: "prefix" (a static
# prefix alone, no latents), else its coprocessor's kind.
COPROCESSOR_KINDS = ("lora", "full")  # "lora": deltas on D's weights (MBs); "full": a copy of D
PREFIX_KIND = "prefix"


@dataclass
class CoprocessorConfig:
    n_latents: int = 4
    kind: str = "lora"  # one of COPROCESSOR_KINDS; "prefix" whenever n_latents is 0
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
    # The static part (coprocessor.prefix): N_P learned key/value positions per layer of D,
    # initialised from D's own cache over training text. 0: none. n_latents 0 with a prefix:
    # no coprocessor at all (kind "prefix").
    prefix_positions: int = 0
    # Initial bias on the prefix's keys (its gate), and how many first positions stay frozen
    # as an attention sink (PEFT's num_frozen_tokens).
    prefix_gate_init: float = 0.0
    prefix_frozen: int = 1
    seed: int = 0

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        if self.n_latents < 0 or self.prefix_positions < 0:
            raise ValueError("n_latents and prefix_positions cannot be negative")
        if not (self.n_latents or self.prefix_positions):
            raise ValueError(
                "an expert needs latents (n_latents), a prefix (prefix_positions) or both"
            )
        if not self.n_latents:
            self.kind = PREFIX_KIND  # no coprocessor, whatever its kind would have been
        elif self.kind not in COPROCESSOR_KINDS:
            raise ValueError(
                "an expert with latents has a coprocessor of kind "
                f"{' or '.join(COPROCESSOR_KINDS)}, not {self.kind!r}"
            )

    def to_dict(self):
        data = asdict(self)
        data["lora_targets"] = list(self.lora_targets)
        return data


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

    def gate_bias(self, batch):
        return self.gate.unsqueeze(0).expand(batch, -1)  # (B, L)


class Coprocessor(nn.Module):
    """An expert: the coprocessor (soft tokens, the latent head, and C's trainable part, LoRA
    or a full copy) and/or the static prefix (``self.prefix``, a ``KVPrefix`` or None).

    The frozen decoder is held by reference, not registered as a submodule, so that
    ``parameters()`` and ``state_dict()`` hold only the expert.
    """

    def __init__(self, decoder, config=None, layer_names=None):
        """``layer_names``: the exact linear layers to adapt (a loaded file's), instead of
        every one whose leaf name is in ``config.lora_targets``."""
        super().__init__()
        self.config = config = config or CoprocessorConfig()
        self._decoder = (decoder,)
        self.prefix = None
        if config.prefix_positions:
            self.prefix = KVPrefix(
                decoder.config,
                config.prefix_positions,
                config.prefix_gate_init,
                config.prefix_frozen,
            )
        # LoRA's layer names and D's modules, in the order of lora_a / lora_b.
        self.lora_names, self.lora_layers = [], []
        if not config.n_latents:
            return
        generator = torch.Generator().manual_seed(config.seed)
        embeddings = decoder.get_input_embeddings().weight.detach()
        hidden = embeddings.shape[1]
        # Soft tokens start as real token embeddings, so C first sees familiar inputs.
        picks = torch.randint(0, embeddings.shape[0], (config.n_latents,), generator=generator)
        self.soft_tokens = nn.Parameter(embeddings[picks].clone().float())
        anchor_id = config.anchor_token_id
        anchor = embeddings[anchor_id if anchor_id is not None else picks[0]]
        self.latent_head = LatentHead(hidden, config.n_latents, anchor.float(), config.gate_init)
        if config.kind == "lora":
            self._init_lora(decoder, generator, layer_names)
        elif config.kind == "full":
            self.full = copy.deepcopy(decoder)
            self.full.requires_grad_(True)

    @property
    def decoder(self):
        return self._decoder[0]

    @property
    def has_coprocessor(self):
        return self.config.n_latents > 0

    def _init_lora(self, decoder, generator, layer_names=None):
        lora.install_lora_hooks(decoder)
        targets = set(self.config.lora_targets)
        self.lora_a, self.lora_b = nn.ParameterList(), nn.ParameterList()
        for name, module in lora.linear_layers(decoder):
            if layer_names is not None and name not in layer_names:
                continue
            if targets and name.rsplit(".", 1)[-1] not in targets:
                continue
            fan_in, fan_out = lora.in_out_features(module)
            a = torch.empty(self.config.lora_rank, fan_in)
            # PEFT's default: kaiming-uniform A, zero B, so the delta starts at exactly zero.
            bound = 1 / math.sqrt(fan_in)
            a.uniform_(-bound, bound, generator=generator)
            self.lora_a.append(nn.Parameter(a))
            self.lora_b.append(nn.Parameter(torch.zeros(fan_out, self.config.lora_rank)))
            self.lora_names.append(name)
            self.lora_layers.append(module)
        if not self.lora_names:
            raise ValueError(f"no linear layers match lora_targets {sorted(targets)}")

    @property
    def lora_scale(self):
        return self.config.lora_alpha / self.config.lora_rank

    @property
    def body(self):
        """The network C runs: D itself (with this expert's LoRA active), or the full copy."""
        return self.full if self.config.kind == "full" else self.decoder

    def active(self):
        """A context in which (in this context only) D's linear layers carry the LoRA deltas."""
        if self.config.kind != "lora" or not self.has_coprocessor:
            return lora.activate({})
        return lora.activate(
            {
                id(module): [lora.RowLoRA(slice(None), a, b, self.lora_scale)]
                for module, a, b in zip(self.lora_layers, self.lora_a, self.lora_b, strict=True)
            }
        )

    def latents(self, past, past_bias, positions):
        """Run C over the soft tokens with D's cache as its past. Returns z: (B, L, H).

        positions: (B,) the position the next real token will take; every soft token gets it.
        """
        batch = past_bias.shape[0]
        n_latents = self.config.n_latents
        dtype = next(self.body.parameters()).dtype
        new_bias = torch.zeros(batch, n_latents, dtype=dtype, device=past_bias.device)
        mask = attention_bias(past_bias.to(dtype), new_bias)
        positions = positions[:, None].expand(batch, n_latents)  # (B, L)
        return self.encode(past, mask, positions, copies=1)

    def encode(self, past, mask, positions, copies):
        """Latents for ``copies`` blocks of soft tokens at once, under a ready 4D mask.

        positions: (B, copies * L). Returns z: (B, copies * L, H).
        """
        dtype = next(self.body.parameters()).dtype
        soft = self.soft_tokens.to(dtype).repeat(copies, 1)  # (copies * L, H)
        soft = soft.unsqueeze(0).expand(positions.shape[0], -1, -1)  # (B, copies * L, H)
        with self.active():
            hidden = forward_with_mask(
                self.body,
                cache=as_cache(past),
                mask=mask.to(dtype),
                inputs_embeds=soft,
                positions=positions,
            )
        batch, _, width = hidden.shape
        hidden = hidden.float().view(batch, copies, self.config.n_latents, width)  # (B, c, L, H)
        return self.latent_head(hidden).reshape(batch, -1, width)  # (B, copies * L, H)

    def gate_bias(self, batch):
        return self.latent_head.gate_bias(batch)

    # --- the expert file ----------------------------------------------------------------------

    def expert_tensors(self):
        """Tensors for the expert file, LoRA under PEFT's names."""
        tensors = {}
        if self.prefix is not None:
            for name, value in self.prefix.named_parameters():
                tensors[f"prefix.{name}"] = value.detach()
        if self.has_coprocessor:
            tensors.update(self._coprocessor_tensors())
        return {k: v.float().contiguous().cpu() for k, v in tensors.items()}

    def _coprocessor_tensors(self):
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
        return tensors

    def expert_metadata(self, base_fingerprint, base_model_id="", training=None):
        config = self.config
        targets = sorted({name.rsplit(".", 1)[-1] for name in self.lora_names})
        kind = config.kind
        return artifact.build_metadata(
            kind=kind,
            base_model_fingerprint=base_fingerprint,
            base_model_id=base_model_id,
            n_latents=config.n_latents,
            prefix_positions=config.prefix_positions,
            hidden_size=self.decoder.config.hidden_size,
            num_layers=self.decoder.config.num_hidden_layers,
            lora_rank=config.lora_rank if kind == "lora" else None,
            lora_alpha=config.lora_alpha if kind == "lora" else None,
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
        kind = metadata["kind"]
        config = CoprocessorConfig(
            **{
                **saved,
                "n_latents": int(metadata["n_latents"]),
                "prefix_positions": int(metadata.get("prefix_positions", 0)),
                "kind": kind,
            }
        )
        layer_names = None
        if kind == "lora":
            config.lora_rank = int(metadata["lora_rank"])
            config.lora_alpha = float(metadata["lora_alpha"])
            # Adapt exactly the layers the file has LoRA for: a file made elsewhere (PEFT, or
            # with other targets) need not cover every linear layer that ours would.
            layer_names = {
                match["module"] for key in tensors if (match := artifact.LORA_NAME.match(key))
            }
        expert = cls(decoder, config, layer_names=layer_names)
        expert.load_expert_tensors(tensors)
        return expert

    @classmethod
    def from_bytes(cls, decoder, data, spec):
        """An expert from a file held in memory, on the decoder's device. Its header is
        validated against ``spec``, the base model's (``registry.models.BaseModel.spec``): every
        caller (serving, jobs, the upload probe) checks the same thing."""
        tensors, metadata = artifact.load_expert_bytes(data, spec)
        device = next(decoder.parameters()).device
        return cls.from_tensors(decoder, tensors, metadata).to(device).eval()

    @classmethod
    def load(cls, decoder, path):
        tensors, metadata = artifact.load_expert(path)
        return cls.from_tensors(decoder, tensors, metadata)

    def _passthrough_head(self):
        hidden = self.latent_head.proj.in_features
        return {
            "latent_head.proj.weight": torch.eye(hidden),
            "latent_head.proj.bias": torch.zeros(hidden),
            "latent_head.anchors": torch.zeros_like(self.latent_head.anchors),
            "latent_head.gate": torch.zeros_like(self.latent_head.gate),
        }

    def load_expert_tensors(self, tensors):
        own = self.expert_tensors()
        if self.has_coprocessor and not any(name in tensors for name in artifact.HEAD_TENSORS):
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
            if self.prefix is not None:
                for name, value in self.prefix.named_parameters():
                    value.copy_(tensors[f"prefix.{name}"])
            if not self.has_coprocessor:
                return
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

    prefix = None
    has_coprocessor = True

    def __init__(self, decoder, n_latents=8, gate_init=-4.0, anchor_token_id=None, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        embeddings = decoder.get_input_embeddings().weight.detach()
        picks = torch.randint(0, embeddings.shape[0], (n_latents,), generator=generator)
        anchor = embeddings[anchor_token_id if anchor_token_id is not None else picks[0]]
        self.latent_head = LatentHead(embeddings.shape[1], n_latents, anchor.float(), gate_init)

    def latents(self, past, past_bias, positions):
        return self.latent_head.anchors.unsqueeze(0).expand(past_bias.shape[0], -1, -1)  # (B, L, H)

    def encode(self, past, mask, positions, copies):
        anchors = self.latent_head.anchors.repeat(copies, 1)  # (copies * L, H)
        return anchors.unsqueeze(0).expand(positions.shape[0], -1, -1)  # (B, copies * L, H)

    def gate_bias(self, batch):
        return self.latent_head.gate_bias(batch)


# --- the augmented forward --------------------------------------------------------------------


def augmented_forward(decoder, expert, *, past, past_bias, tokens, positions):
    """D's logits (B, M, V) over [latents, tokens] after its cache; with ``expert=None``, over
    tokens alone.

    past/past_bias: D's cache of each row's prefix (all but the last prompt token, left-padded
    or masked), after the expert's static prefix if it has one (``train.position_batch``).
    tokens: (B, M) the last prompt token and any following ones. positions: (B,) the position
    of tokens[:, 0]; latents share it.
    """
    batch, n_tokens = tokens.shape
    dtype = next(decoder.parameters()).dtype
    inputs = embed(decoder, tokens)  # (B, M, H)
    new_positions = positions[:, None] + torch.arange(n_tokens, device=tokens.device)  # (B, M)
    new_bias = torch.zeros(batch, n_tokens, dtype=dtype, device=tokens.device)
    if expert is not None and expert.has_coprocessor:
        z = expert.latents(past, past_bias, positions)  # (B, L, H)
        inputs, new_bias, new_positions = after_latents(
            z, expert.gate_bias(batch), inputs, new_bias, new_positions, positions
        )  # (B, L + M, ...)
    logits, _ = run_decoder(
        decoder,
        past=past,
        past_bias=past_bias.to(dtype),
        inputs_embeds=inputs,
        new_bias=new_bias,
        positions=new_positions,
        logits_last=n_tokens,
    )
    return logits


def after_latents(latents, gate, inputs, bias, positions, start):
    """[latents, inputs] for one pass of D: the latents go first, behind their gate, at
    ``start``, the position of the first fed token, which they share. Every caller (training's
    packed points, evaluation, serving) feeds its tokens after the latents through this.

    latents (..., L, H) and gate (..., L); inputs (..., M, H) with their bias (..., M) and
    positions (..., M); start (...). Returns (..., L + M, H), (..., L + M), (..., L + M).
    """
    latent_positions = start[..., None].expand(*start.shape, latents.shape[-2])
    return (
        torch.cat([latents.to(inputs.dtype), inputs], dim=-2),
        torch.cat([gate.to(bias.dtype), bias], dim=-1),
        torch.cat([latent_positions, positions], dim=-1),
    )


# --- latents for a batch of experts, folded into the prefill ----------------------------------


def prefill_with_latents(decoder, token_ids, visible, experts_by_row, prefix=None):
    """D's cache over the prompts and each LoRA expert's latents on its row, in one forward.

    Each row's soft tokens go after its prompt (``decoder.prefill``) with its expert's deltas
    on those positions only; rows whose expert is None get none (their latents are hidden by
    a ``negative`` gate). ``prefix``: the rows' static prefixes (``prefix.batch_prefixes``),
    which C reads as part of the cache. Equal to each expert's own ``latents`` on its rows. Returns
    (prefilled, z, gate): z (B, L, H) and gate (B, L), L the most latents of any row.
    """
    soft = _soft_tokens(decoder, experts_by_row)  # (B, L, H)
    with lora.row_adapters(experts_by_row, tail=soft.shape[1]):
        prefilled = prefill(decoder, token_ids, visible, soft, prefix)
    z, gate = _latent_heads(experts_by_row, prefilled.hidden[:, token_ids.shape[1] :])
    return prefilled, z, gate


def _soft_tokens(decoder, experts_by_row):
    """Each row's soft tokens, zero-padded to the longest count: (B, L, H). Padding comes
    last and soft tokens are causal among themselves, so it changes nothing before it."""
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
