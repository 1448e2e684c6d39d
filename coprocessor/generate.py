"""Generation from an augmented cache: greedy or sampled, batched across experts, rows joining
and leaving between steps.

``RunningBatch`` holds the rows being generated together and their one shared cache. ``admit``
prefills new rows together (left-padded prompts; the LoRA experts' latents come from that
prefill's own forward, ``expert.prefill_with_latents``, each row with its expert's deltas;
full-copy experts run their copy on their rows; static prefixes go in front of their rows'
prompts) and joins them to the running rows; ``step`` decodes one token for every row, with
plain D, and retires the rows that end. Rows are right-aligned in the cache: a row's older
columns and the padding before them are hidden by its bias, positions are explicit, so a row's
output does not depend on what else is in the batch or when it joined; sampling uses a
generator per request.

An expert whose pass raises, or whose latents or logits are not finite (D's own hidden states
overflowing count: ``decoder.forward_with_mask``), is dropped for its own rows only: they are
prefilled again by plain D (``Generation.degraded`` says why). Plain rows never read an
expert's weights (``lora.row_adapters``).
"""

import secrets
import time
from dataclasses import dataclass, field

import torch

from .base_models import cache_shape
from .decoder import cache_tensors, embed, negative, prefill, roomy_cache, run_decoder, select_rows
from .expert import after_latents, prefill_with_latents
from .prefix import PrefixBatch, batch_prefixes


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
    # Who asks (any hashable; None: nobody in particular): the engine bounds the cache
    # columns one caller's running rows hold (``engine.Limits.caller_columns``).
    caller: object = None

    def cache_columns(self):
        """The most cache columns this request's row can reach: its expert's static prefix
        and latents, the prompt, and every new token."""
        columns = len(self.prompt_ids) + self.max_new_tokens
        if self.expert is not None:
            columns += self.expert.config.prefix_positions + self.expert.config.n_latents
        return columns


# Why a row's expert was dropped, or its row ended, when its numbers broke: NaN or infinite
# latents or logits, or D's hidden states overflowed (``decoder.forward_with_mask``). The same
# bytes break other rows alike, so the service rejects such a version.
NOT_FINITE = "its latents or logits are not finite"


@dataclass
class Generation:
    token_ids: list[int]
    # "stop" (eos, a stop token or the caller), "length", or how the row was ended early:
    # "cancelled", "deadline", "error" (``error`` says what)
    finish_reason: str
    timings: dict = field(default_factory=dict)
    degraded: str = ""  # why the request's expert was dropped for the plain decoder, if it was
    error: str = ""

    @property
    def broke_numbers(self):
        """Whether its latents or logits stopped being finite (at prefill: its expert was
        dropped; later: the row ended)."""
        return NOT_FINITE in (self.degraded, self.error)


@dataclass(eq=False)
class Row:
    """One request being generated: its own state beside its columns of the shared cache."""

    request: Request
    tag: object  # the caller's handle on the row
    expert: object  # the request's expert, or None once it was dropped
    generator: torch.Generator | None
    tokens: list = field(default_factory=list)
    position: int = 0  # the position the next fed token takes
    next_token: int | None = None  # chosen, not yet fed to D
    # A long prompt's cache built ahead of its join (``ChunkedPrefill``): its static prefix
    # and its first ``head_tokens`` prompt tokens, which the join then does not prefill again
    head: PrefixBatch | None = None
    head_tokens: int = 0
    finish_reason: str | None = None
    degraded: str = ""
    error: str = ""

    def end(self, reason, error=""):
        self.finish_reason, self.error = reason, error

    def generation(self, timings=None):
        return Generation(
            self.tokens, self.finish_reason, dict(timings or {}), self.degraded, self.error
        )


@dataclass
class _Part:
    """New rows after their prefill: their cache, bias, next positions and first logits."""

    past: list
    bias: torch.Tensor  # (n, W)
    positions: torch.Tensor  # (n,) the position of each row's first new token
    logits: torch.Tensor  # (n, V)


class RunningBatch:
    """The rows generated together and their shared cache (``cache``, with room for every
    column the rows can still add, so a step writes in place; ``past``: its (keys, values) per
    layer, each ``(B, kv_heads, W, head_dim)``; ``bias`` (B, W))."""

    def __init__(self, decoder, eos_token_id=None):
        self.decoder = decoder
        self.eos_token_id = eos_token_id
        parameter = next(decoder.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.rows = []
        self.cache = None
        self.bias = None

    @property
    def past(self):
        return None if self.cache is None else cache_tensors(self.cache)

    @property
    def width(self):
        return 0 if self.bias is None else self.bias.shape[1]

    @torch.no_grad()
    def admit(self, requests, tags=None):
        """Prefill ``requests`` together and join them to the running rows; returns the rows
        that already ended (at their first token)."""
        if any(len(r.prompt_ids) == 0 for r in requests):
            raise ValueError("every prompt needs at least one token")
        tags = tags if tags is not None else [None] * len(requests)
        return self.admit_rows([new_row(r, tag) for r, tag in zip(requests, tags, strict=True)])

    @torch.no_grad()
    def admit_rows(self, rows):
        """``admit`` for rows made already (a row with a ``head`` is admitted alone)."""
        if len(rows) > 1 and any(row.head is not None for row in rows):
            raise ValueError("a row whose prompt is partly cached is admitted alone")
        ended = []
        for group, part in self._prefill(rows):
            ended += self._join(group, part)
        return ended

    @torch.no_grad()
    def step(self):
        """One new token for every running row; returns the rows that ended."""
        if not self.rows:
            return []
        batch = len(self.rows)
        feed = torch.tensor([[row.next_token] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.position] for row in self.rows], device=self.device)
        new_bias = torch.zeros(batch, 1, dtype=self.dtype, device=self.device)
        logits, _ = run_decoder(
            self.decoder,
            past=self.cache,
            past_bias=self.bias,
            inputs_embeds=embed(self.decoder, feed),
            new_bias=new_bias,
            positions=positions,
            logits_last=1,
        )
        self.bias = torch.cat([self.bias, new_bias], dim=1)
        for row in self.rows:
            row.position += 1
        self._advance(self.rows, logits[:, -1])
        return self.retire()

    def retire(self):
        """Drop the rows that ended (also those the caller ended) and the cache columns no
        remaining row can see; returns the dropped rows."""
        ended = [row for row in self.rows if row.finish_reason]
        if not ended:
            return []
        keep = [i for i, row in enumerate(self.rows) if not row.finish_reason]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.bias = None
            return ended
        index = torch.tensor(keep, device=self.device)
        bias = self.bias[index]
        first = int((bias > negative(self.dtype)).any(0).int().argmax())  # leading padding
        self.bias = bias[:, first:]
        past = [(k[:, :, first:], v[:, :, first:]) for k, v in select_rows(self.past, index)]
        self._keep(past)
        return ended

    # --- admission ------------------------------------------------------------------------

    def _prefill(self, rows):
        """[(rows, _Part)] for new rows. An expert that raises, or gives latents or logits that
        are not finite, is dropped for its rows, which are prefilled again by plain D."""
        try:
            groups = [(rows, self._prefill_part(rows))]
        except Exception as exc:
            by_expert = {}
            for row in rows:
                by_expert.setdefault(id(row.expert), []).append(row)
            if len(by_expert) > 1:  # find whose expert it was: each expert's rows alone
                return [pair for group in by_expert.values() for pair in self._prefill(group)]
            if rows[0].expert is None:
                raise  # plain D itself failed: not an expert's fault
            return self._prefill(_drop_expert(rows, f"the expert failed: {exc}"))
        part = groups[0][1]
        finite = torch.isfinite(part.logits).all(-1).tolist()
        broken = [row for row, ok in zip(rows, finite, strict=True) if not ok and row.expert]
        if not broken:
            return groups
        kept = [i for i, row in enumerate(rows) if row not in broken]
        groups = [(rows_at(rows, kept), _select(part, kept))] if kept else []
        return groups + self._prefill(_drop_expert(broken, NOT_FINITE))

    def _prefill_part(self, rows):
        """D's cache over the new rows' static prefixes, prompts and latents, and the logits
        of their first new token (the prompt's last token, read after the latents)."""
        past, past_bias, positions, latents, latent_bias = self._cache_and_latents(rows)
        last = torch.tensor([[r.request.prompt_ids[-1]] for r in rows], device=self.device)
        inputs, new_bias, new_positions = after_latents(
            latents,
            latent_bias,
            embed(self.decoder, last),
            torch.zeros(len(rows), 1, dtype=self.dtype, device=self.device),
            positions[:, None],
            positions,
        )  # (n, L + 1, ...)
        logits, past = run_decoder(
            self.decoder,
            past=past,
            past_bias=past_bias,
            inputs_embeds=inputs,
            new_bias=new_bias,
            positions=new_positions,
            logits_last=1,
        )
        logits = logits[:, -1]
        # NaN latents behind a gate still poison the row: its logits show it.
        logits = torch.where(torch.isfinite(latents).all(-1).all(-1)[:, None], logits, torch.nan)
        return _Part(past, torch.cat([past_bias, new_bias], dim=1), positions + 1, logits)

    def _cache_and_latents(self, rows):
        """D's cache over the rows' static prefixes and prompts but their last tokens, and
        each row's latents with their gate (padded to the most, hidden where a row has fewer).
        A row's ``head``, when it has one, stands for its prefix and the prompt tokens it
        holds."""
        prompts, visible = _left_pad(
            [r.request.prompt_ids[r.head_tokens : -1] for r in rows], self.device
        )
        experts = [row.expert for row in rows]
        static = rows[0].head
        if static is None:
            static = batch_prefixes(
                [getattr(e, "prefix", None) for e in experts], self.dtype, self.device
            )
        lora_experts = [e if _kind(e) == "lora" else None for e in experts]
        if any(lora_experts):
            prefilled, z, gate = prefill_with_latents(
                self.decoder, prompts, visible, lora_experts, prefix=static
            )
        else:
            prefilled, z, gate = prefill(self.decoder, prompts, visible, prefix=static), None, None
        past, past_bias, positions, _ = prefilled
        latents, latent_bias = _latents(
            self.decoder, experts, past, past_bias, positions, self.dtype, z, gate
        )
        return past, past_bias, positions, latents, latent_bias

    def _join(self, rows, part):
        """Choose the new rows' first tokens; those that go on join the running batch."""
        for row, position in zip(rows, part.positions.tolist(), strict=True):
            row.position = position
        self._advance(rows, part.logits)
        going = [i for i, row in enumerate(rows) if not row.finish_reason]
        if going:
            part = _select(part, going) if len(going) < len(rows) else part
            self._append(rows_at(rows, going), part)
        return [row for row in rows if row.finish_reason]

    def _append(self, rows, part):
        if not self.rows:
            self.rows, self.bias = list(rows), part.bias
            self._keep(part.past)
            return
        width = max(self.width, part.bias.shape[1])
        old_past, old_bias = _pad_left(self.past, self.bias, width)
        new_past, new_bias = _pad_left(part.past, part.bias, width)
        self.bias = torch.cat([old_bias, new_bias])
        self.rows += rows
        self._keep(
            [
                (torch.cat([k, nk]), torch.cat([v, nv]))
                for (k, v), (nk, nv) in zip(old_past, new_past, strict=True)
            ]
        )

    def absorb(self, other):
        """Take ``other``'s rows and their cache: one forward per step serves both."""
        if other.rows:
            self._append(other.rows, _Part(other.past, other.bias, None, None))
        other.rows, other.cache, other.bias = [], None, None

    def _keep(self, past):
        """Hold ``past`` for the rows, with room for the most tokens any of them can still add."""
        room = max(row.request.max_new_tokens - len(row.tokens) for row in self.rows)
        self.cache = roomy_cache(past, room)

    # --- choosing tokens ------------------------------------------------------------------

    def _advance(self, rows, logits):
        """Choose each row's next token from its logits (n, V) and hand it on."""
        finite = torch.isfinite(logits).all(-1).tolist()
        greedy = logits.argmax(-1).tolist()  # one transfer for every greedy row
        for i, row in enumerate(rows):
            if not finite[i]:
                row.end("error", NOT_FINITE)
                continue
            request = row.request
            token = greedy[i] if request.temperature <= 0 else _sample(logits[i], row)
            if token == self.eos_token_id or token in request.stop_ids:
                row.end("stop")
                continue
            row.tokens.append(token)
            try:
                stop = request.on_token is not None and request.on_token(token)
            except Exception as exc:  # the caller's callback: its own row ends, no other
                row.end("error", f"the token callback failed: {exc}")
                continue
            if stop:
                row.end("stop")
            elif len(row.tokens) >= request.max_new_tokens:
                row.end("length")
            else:
                row.next_token = token


@torch.no_grad()
def generate(decoder, requests, eos_token_id=None):
    """Generate for every request in one batch, each to its end; a Generation per request, in
    order."""
    if not requests:
        return []
    batch = RunningBatch(decoder, eos_token_id)
    started = time.perf_counter()
    ended = batch.admit(requests, tags=range(len(requests)))
    timings = {"prefill_s": time.perf_counter() - started}
    started = time.perf_counter()
    while batch.rows:
        ended += batch.step()
    timings["decode_s"] = time.perf_counter() - started
    by_tag = {row.tag: row.generation(timings) for row in ended}
    return [by_tag[i] for i in range(len(requests))]


class ChunkedPrefill:
    """A long prompt's row whose cache is built ``advance(tokens)`` at a time (chunked prefill,
    as vLLM schedules it), so that the engine can run decode steps of other rows between the
    slices instead of stalling them for the whole prompt. Once every prompt token but the last
    is cached, ``join()`` gives a batch of its own with the row in it: its latents and last
    token then go through D as any row's do.

    The cache has room for the whole prompt from the start (``decoder.roomy_cache``), so a
    slice writes its columns in place. An expert whose pass raises is dropped and the prompt
    starts again plain; values that are not finite show in the join's logits, where the row
    is prefilled again by plain D (``RunningBatch._prefill``), whole."""

    def __init__(self, decoder, eos_token_id, request, tag=None):
        if not request.prompt_ids:
            raise ValueError("every prompt needs at least one token")
        self.batch = RunningBatch(decoder, eos_token_id)
        self.row = new_row(request, tag)
        try:
            self._start()
        except Exception as exc:
            self._start_plain(exc)

    @property
    def left(self):
        """Prompt tokens still to cache before the join (the last one goes in at the join)."""
        return len(self.row.request.prompt_ids) - 1 - self.row.head_tokens

    @torch.no_grad()
    def advance(self, tokens):
        """Cache the prompt's next ``tokens`` tokens; True once only the join is left."""
        row, batch = self.row, self.batch
        start = row.head_tokens
        end = start + min(tokens, self.left)
        ids = torch.tensor([row.request.prompt_ids[start:end]], device=batch.device)
        head = row.head._replace(past=self.cache)
        try:
            prefilled = prefill(
                batch.decoder, ids, torch.ones_like(ids, dtype=torch.bool), prefix=head
            )
        except Exception as exc:
            self._start_plain(exc)
            return False
        row.head = PrefixBatch(
            cache_tensors(self.cache), prefilled.past_bias, prefilled.next_positions
        )
        row.head_tokens += ids.shape[1]
        return self.left == 0

    @torch.no_grad()
    def join(self):
        """The row's own RunningBatch, and the rows that ended at their first token."""
        return self.batch, self.batch.admit_rows([self.row])

    def _start(self):
        """An empty head over the row's static prefix, with room for its whole prompt."""
        batch, row = self.batch, self.row
        prefix = getattr(row.expert, "prefix", None)
        head = batch_prefixes([prefix], batch.dtype, batch.device) if prefix is not None else None
        if head is None:
            layers, kv_heads, head_dim = cache_shape(batch.decoder.config)
            empty = torch.zeros(1, kv_heads, 0, head_dim, dtype=batch.dtype, device=batch.device)
            head = PrefixBatch(
                [(empty, empty)] * layers,
                empty.new_zeros(1, 0),
                torch.zeros(1, dtype=torch.long, device=batch.device),
            )
        self.cache = roomy_cache(head.past, len(row.request.prompt_ids))
        row.head, row.head_tokens = head, 0

    def _start_plain(self, exc):
        """Drop the row's expert, whose pass raised ``exc``, and start its prompt again."""
        if self.row.expert is None:
            raise exc  # plain D itself failed: not an expert's fault
        _drop_expert([self.row], f"the expert failed: {exc}")
        self._start()


@torch.no_grad()
def prompt_latents(decoder, expert, prompt_ids):
    """The latents (L, H) and their gate bias (L,) that ``expert`` writes for a prompt, as
    serving computes them (``RunningBatch``): for callers that run their own decoder."""
    rows = [new_row(Request(list(prompt_ids), expert))]
    *_, latents, gate = RunningBatch(decoder)._cache_and_latents(rows)
    return latents[0], gate[0]


def new_row(request, tag=None):
    return Row(request, tag, request.expert, _generator(request))


def rows_at(rows, indices):
    return [rows[i] for i in indices]


def _drop_expert(rows, reason):
    """The rows go on with plain D; a partly cached prompt is prefilled again, whole."""
    for row in rows:
        row.expert, row.degraded = None, reason
        row.head, row.head_tokens = None, 0
    return rows


def _select(part, indices):
    index = torch.tensor(indices, device=part.bias.device)
    return _Part(
        select_rows(part.past, index), part.bias[index], part.positions[index], part.logits[index]
    )


def _pad_left(past, bias, width):
    """Hidden columns in front of a cache, up to ``width``."""
    missing = width - bias.shape[1]
    if missing == 0:
        return past, bias
    pad_bias = torch.full(
        (bias.shape[0], missing), negative(bias.dtype), dtype=bias.dtype, device=bias.device
    )
    padded = []
    for k, v in past:
        zeros = k.new_zeros(k.shape[0], k.shape[1], missing, k.shape[3])
        padded.append((torch.cat([zeros, k], dim=2), torch.cat([zeros, v], dim=2)))
    return padded, torch.cat([pad_bias, bias], dim=1)


def _generator(request):
    if request.temperature <= 0:
        return None
    seed = request.seed if request.seed is not None else secrets.randbits(63)  # fresh each time
    return torch.Generator(device="cpu").manual_seed(seed)


def _left_pad(sequences, device):
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    visible = torch.zeros(len(sequences), width, dtype=torch.bool, device=device)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence) :] = torch.tensor(sequence, device=device)
            visible[row, width - len(sequence) :] = True
    return ids, visible


def _latents(decoder, experts, past, past_bias, positions, dtype, lora_z, lora_gate):
    """Each row's latents, padded to the longest with hidden columns: (B, L, H) and their gate
    bias (B, L).

    The LoRA experts' latents come from the prefill (``lora_z``, ``lora_gate``, or None when
    the rows have none); full-copy experts run their own copy on their rows.
    """
    batch, device = len(experts), positions.device
    width = max((e.config.n_latents for e in experts if _kind(e)), default=0)
    latents = torch.zeros(batch, width, decoder.config.hidden_size, dtype=dtype, device=device)
    bias = torch.full((batch, width), negative(dtype), dtype=dtype, device=device)
    if lora_z is not None:
        latents[:, : lora_z.shape[1]] = lora_z.to(dtype)
        bias[:, : lora_z.shape[1]] = lora_gate
    for row, expert in enumerate(experts):
        if _kind(expert) == "full":
            index = torch.tensor([row], device=device)
            rows_past = select_rows(past, index) if past is not None else None
            z = expert.latents(rows_past, past_bias[index], positions[index])
            latents[index, : z.shape[1]] = z.to(dtype)
            bias[index, : z.shape[1]] = expert.gate_bias(1).to(dtype)
    return latents, bias


def _kind(expert):
    """The kind of the expert's coprocessor: "lora", "full", or None (no expert, or a static
    prefix alone)."""
    if expert is None or not expert.has_coprocessor:
        return None
    return expert.config.kind


def _sample(logits, row):
    request = row.request
    probs = torch.softmax(logits.float().cpu() / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < request.top_p
        keep[0] = True  # the likeliest token always stays
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=row.generator))
