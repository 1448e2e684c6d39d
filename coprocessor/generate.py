"""Generation from an augmented cache: greedy or sampled, batched across experts.

Each request has its own prompt, expert (or none) and sampling settings. The batch shares one
decoder: prompts are left-padded; the LoRA experts' latents come from the prefill's own forward
(``expert.prefill_with_latents``, each row with its expert's deltas), full-copy experts run
their copy on their rows; latents are padded to the longest with hidden columns, and decoding
is plain D for every row. A row's output does not depend on what else is in the batch:
sampling uses a generator per request.
"""

import secrets
import time
from dataclasses import dataclass, field

import torch

from .decoder import embed, negative, prefill, run_decoder, select_rows
from .expert import prefill_with_latents
from .prefix import batch_prefixes


@dataclass
class Request:
    prompt_ids: list[int]
    expert: object = None  # a Coprocessor, or None for the plain decoder
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    # Called with each new token id as it is chosen (streaming); a true result stops the row.
    on_token: object = None


@dataclass
class Generation:
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or a stop token) or "length"
    timings: dict = field(default_factory=dict)


@torch.no_grad()
def generate(decoder, requests, eos_token_id=None):
    """Generate for every request in one batch; returns a Generation per request, in order."""
    if not requests:
        return []
    if any(len(r.prompt_ids) == 0 for r in requests):
        raise ValueError("every prompt needs at least one token")
    device = next(decoder.parameters()).device
    dtype = next(decoder.parameters()).dtype
    timings = {}
    started = time.perf_counter()
    prefix_ids, visible = _left_pad([r.prompt_ids[:-1] for r in requests], device)
    # Static prefixes go in front of their rows' prompts; they cost no pass of their own.
    static = batch_prefixes([getattr(r.expert, "prefix", None) for r in requests], dtype, device)
    lora_experts = [r.expert if _kind(r.expert) == "lora" else None for r in requests]
    if any(lora_experts):
        # The LoRA experts' pass rides along with the prefill (its time counts as prefill).
        prefilled, z, gate = prefill_with_latents(
            decoder, prefix_ids, visible, lora_experts, prefix=static
        )
    else:
        prefilled, z, gate = prefill(decoder, prefix_ids, visible, prefix=static), None, None
    past, past_bias, positions, _ = prefilled
    timings["prefill_s"] = time.perf_counter() - started

    started = time.perf_counter()
    latents, latent_bias = _latents(decoder, requests, past, past_bias, positions, dtype, z, gate)
    timings["coprocessor_s"] = time.perf_counter() - started

    started = time.perf_counter()
    last = torch.tensor([[r.prompt_ids[-1]] for r in requests], device=device)
    inputs = torch.cat([latents, embed(decoder, last)], dim=1)  # (B, L + 1, H)
    new_bias = torch.cat(
        [latent_bias, torch.zeros(len(requests), 1, dtype=dtype, device=device)], dim=1
    )  # (B, L + 1)
    new_positions = positions[:, None].expand(-1, inputs.shape[1])  # (B, L + 1)
    logits, past = run_decoder(
        decoder,
        past=past,
        past_bias=past_bias,
        inputs_embeds=inputs,
        new_bias=new_bias,
        positions=new_positions,
        logits_last=1,
    )
    past_bias = torch.cat([past_bias, new_bias], dim=1)  # (B, P + L + 1)
    outputs = _decode(decoder, requests, logits[:, -1], past, past_bias, positions, eos_token_id)
    timings["decode_s"] = time.perf_counter() - started
    for output in outputs:
        output.timings = dict(timings)
    return outputs


def _left_pad(sequences, device):
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    visible = torch.zeros(len(sequences), width, dtype=torch.bool, device=device)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence) :] = torch.tensor(sequence, device=device)
            visible[row, width - len(sequence) :] = True
    return ids, visible


def _latents(decoder, requests, past, past_bias, positions, dtype, lora_z, lora_gate):
    """Each request's latents on its row, padded to the longest with hidden columns: (B, L, H)
    and their gate bias (B, L).

    The LoRA experts' latents come from the prefill (``lora_z``, ``lora_gate``, or None when
    the batch has none); full-copy experts run their own copy on their rows.
    """
    batch, device = len(requests), positions.device
    width = max((r.expert.config.n_latents for r in requests if _kind(r.expert)), default=0)
    latents = torch.zeros(batch, width, decoder.config.hidden_size, dtype=dtype, device=device)
    bias = torch.full((batch, width), negative(dtype), dtype=dtype, device=device)
    if lora_z is not None:
        latents[:, : lora_z.shape[1]] = lora_z.to(dtype)
        bias[:, : lora_z.shape[1]] = lora_gate
    for row, request in enumerate(requests):
        if _kind(request.expert) == "full":
            index = torch.tensor([row], device=device)
            rows_past = select_rows(past, index) if past is not None else None
            z = request.expert.latents(rows_past, past_bias[index], positions[index])
            latents[index, : z.shape[1]] = z.to(dtype)
            bias[index, : z.shape[1]] = request.expert.gate_bias(1).to(dtype)
    return latents, bias


def _kind(expert):
    """The kind of the expert's coprocessor: "lora", "full", or None (no expert, or a static
    prefix alone)."""
    if expert is None or not expert.has_coprocessor:
        return None
    return expert.config.kind


def _decode(decoder, requests, logits, past, past_bias, positions, eos_token_id):
    batch, device = len(requests), logits.device
    generators = [
        torch.Generator(device="cpu").manual_seed(
            r.seed if r.seed is not None else secrets.randbits(63)  # unseeded: fresh each time
        )
        for r in requests
    ]
    tokens = [[] for _ in requests]
    finished = [None] * batch
    step = 0
    while True:
        next_ids = [_choose(logits[row], requests[row], generators[row]) for row in range(batch)]
        for row, token in enumerate(next_ids):
            if finished[row]:
                continue
            request = requests[row]
            if token == eos_token_id or token in request.stop_ids:
                finished[row] = "stop"
                continue
            tokens[row].append(token)
            if request.on_token is not None and request.on_token(token):
                finished[row] = "stop"
                continue
            if len(tokens[row]) >= request.max_new_tokens:
                finished[row] = "length"
        if all(finished):
            break
        step += 1
        feed = torch.tensor(next_ids, device=device)[:, None]
        new_bias = torch.zeros(batch, 1, dtype=past_bias.dtype, device=device)
        logits, past = run_decoder(
            decoder,
            past=past,
            past_bias=past_bias,
            inputs_embeds=embed(decoder, feed),
            new_bias=new_bias,
            positions=(positions + step)[:, None],
            logits_last=1,
        )
        logits = logits[:, -1]  # (B, V)
        past_bias = torch.cat([past_bias, new_bias], dim=1)  # (B, P + step)
    return [Generation(token_ids=t, finish_reason=f) for t, f in zip(tokens, finished, strict=True)]


def _choose(logits, request, generator):
    if request.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < request.top_p
        keep[0] = True  # the likeliest token always stays
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
