"""One generation request from names to text: choose, load, generate, degrade, account.

Views (native and OpenAI-compatible) parse their own request shapes into ``Ask``, ``admit`` it,
and format what ``Pending.events`` gives (text as it comes, a plain retry, the ``Answer``) as
JSON or server-sent events; everything they share is here.
"""

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field

import torch
from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings

from coprocessor import base_models, routing
from coprocessor.compose import CannotCompose, Composition
from coprocessor.engine import Overloaded, TooLarge  # noqa: F401 (Overloaded: views answer 503)
from coprocessor.generate import NOT_FINITE, Request, prompt_latents
from registry.models import BaseModel

from . import choose, fair_use
from .choose import UnknownModel  # noqa: F401 (views answer 404)
from .models import Usage
from .pool import ExpertUnavailable, pool


class BadRequest(ValueError):
    """The request cannot be served as asked (400); the message says why."""


@dataclass
class Ask:
    base: str
    expert: str = ""  # "", "auto", "owner/name", "owner/name@N" or "owner/name@alias"
    prompt: str | None = None
    messages: list | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list = field(default_factory=list)


@dataclass
class Retry:
    """The expert broke the row before any of its text went out: the plain model answers
    instead, from the start (``reason`` says why)."""

    reason: str


@dataclass
class Answer:
    text: str
    token_ids: list  # empty when the serving process answered over HTTP: it sends the count
    completion_tokens: int
    finish_reason: str
    expert: str | None
    augmented: bool
    reason: str
    score: float | None
    prompt_tokens: int
    timings_ms: dict


def parse_model(model):
    """OpenAI ``model``: ``<base>``, ``<base>:auto`` or ``<base>:<owner>/<name>[@<n>]``."""
    base, _, expert = (model or "").partition(":")
    return base, expert


def base_record(slug):
    if settings.LATENTRY_SERVING_URL:  # a web process: the models are in the serving process
        raise UnknownModel(f"models are served at {settings.LATENTRY_SERVING_URL}, not here")
    record = BaseModel.objects.filter(slug=slug).first()
    if record is None or not record.weights_location:
        raise UnknownModel(f"no base model {slug!r} is served here")
    return record


def prompt_ids(loaded, ask):
    if ask.messages is not None:
        return base_models.chat_prompt_ids(loaded.tokenizer, ask.messages)
    ids = loaded.tokenizer(ask.prompt or "", add_special_tokens=False)["input_ids"]
    if not ids:
        raise BadRequest("the prompt is empty")
    return list(ids)


def routing_ids(loaded, ask, ids):
    """What ``auto`` reads: the user's own words. A chat template's system text and markers
    are the same in every request and would pull every prompt toward the same point."""
    if ask.messages is None:
        return ids
    text = "\n".join(m["content"] for m in ask.messages if m.get("role") == "user")
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"] or ids


def check_length(loaded, ids, max_new_tokens):
    context = loaded.record.context_length
    if max_new_tokens > settings.LATENTRY_MAX_NEW_TOKENS:
        raise BadRequest(
            f"max_new_tokens {max_new_tokens} is over the limit of "
            f"{settings.LATENTRY_MAX_NEW_TOKENS}"
        )
    if len(ids) + max_new_tokens > context:
        raise BadRequest(
            f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) does not "
            f"fit the context of {context} tokens"
        )


def pick(loaded, ask, ids, user):
    """(Choice, expert module or None) for the request; UnknownModel for a named expert that
    is not there. One that is there but cannot run now degrades to none, with a reason; a
    composition (``a/x+b/y``) of experts that cannot compose is a BadRequest."""
    spec = (ask.expert or "").strip()
    if not spec:
        return choose.Choice(reason="no expert requested"), None
    if spec == "auto":
        hidden, *halves = routing_hidden(loaded, ask, ids, settings.LATENTRY_AUTO_COMPOSE)
        choice = choose.auto(hidden, loaded.record, user, loaded.routing_centre, halves)
    else:
        by_name = choose.composed if "+" in spec else choose.named
        try:
            choice = by_name(spec, loaded.record, user)
        except ValueError as exc:  # a client's mistake, unlike a missing expert (UnknownModel)
            raise BadRequest(str(exc)) from None
    if not choice.chosen:
        return choice, None
    try:
        expert = load_chosen(loaded, choice)
    except ExpertUnavailable as exc:
        return choose.Choice(score=choice.score, reason=f"{choice.name}: {exc}"), None
    if problem := _room_problem(loaded, ids, ask.max_new_tokens, expert):
        return choose.Choice(score=choice.score, reason=f"{choice.name}: {problem}"), None
    return choice, expert


def routing_hidden(loaded, ask, ids, halves=False):
    """What auto compares with the experts' profiles: the prompt's mean hidden state; with
    ``halves``, then each half's, read apart (where a prompt joins two domains, what each
    half matches), unless a half would be under ``choose.MIN_HALF_TOKENS``. One pass of D,
    a row each."""
    routed = routing_ids(loaded, ask, ids)
    half = len(routed) // 2
    rows = [routed]
    if halves and half >= choose.MIN_HALF_TOKENS:
        rows += [routed[:half], routed[half:]]
    device = next(loaded.decoder.parameters()).device
    lengths = torch.tensor([[len(row)] for row in rows], device=device)
    prompt = torch.tensor([row + [0] * (len(routed) - len(row)) for row in rows], device=device)
    visible = torch.arange(len(routed), device=device) < lengths
    return list(routing.mean_hidden(loaded.decoder, prompt, visible).cpu())


def load_chosen(loaded, choice):
    """The expert module of a Choice: its version's, or its parts' composed (each part from
    the expert cache, held there once however many compositions use it)."""
    if not choice.parts:
        return pool().expert(loaded, choice.version)
    experts = [pool().expert(loaded, part.version) for part in choice.parts]
    try:
        return Composition(experts, names=[part.name for part in choice.parts])
    except CannotCompose as exc:
        raise BadRequest(f"{choice.name} cannot be composed: {exc}") from None


def _room_problem(loaded, ids, max_new_tokens, expert):
    """Why the expert's prefix and latents do not fit beside the request, or None. Such a
    request is served plain rather than refused: the expert was optional."""
    extra = expert.config.prefix_positions + expert.config.n_latents
    context = loaded.record.context_length
    if len(ids) + max_new_tokens + extra > context:
        return (
            f"its {extra} prefix and latent positions do not fit the context of {context} "
            f"tokens beside the prompt and max_new_tokens"
        )
    return None


def prepare(ask):
    """(loaded base, prompt ids) for ``ask``, or UnknownModel / BadRequest: everything that
    can be refused before any work is done."""
    loaded = pool().base(base_record(ask.base))
    ids = prompt_ids(loaded, ask)
    check_length(loaded, ids, ask.max_new_tokens)
    return loaded, ids


def run(ask, user, on_text=None, prepared=None):
    """Serve ``ask``; ``on_text(delta)`` streams the text as it is generated."""
    return plan(ask, user, on_text, prepared).submit().answer()


async def admit(ask, user, *, caller, api_key=None):
    """Plan ``ask`` and queue it within ``caller``'s fair use (``registry.auth.caller``): every
    refusal (UnknownModel, BadRequest, fair use's 429, Overloaded) comes from here. The Pending
    gives back what it holds when its ``events`` end, or on ``close``; ``api_key``'s usage is
    then recorded. One trip to a thread: the serving process's few threads are shared by every
    open request (``inference.asgi``), so each trip may wait behind another request's."""
    return await sync_to_async(_admit)(ask, user, caller, api_key)


def _admit(ask, user, caller, api_key):
    prepared = prepare(ask)
    fair_use.acquire(caller, len(prepared[1]))
    try:
        pending = plan(ask, user, prepared=prepared, caller=caller)
        pending.holding, pending.api_key = caller, api_key
        pending.submit()
    except BaseException:
        fair_use.release(caller, 0)
        raise
    return pending


def run_together(asks, user, prepared=None, caller=None):
    """Serve several asks at once: all are chosen before any is queued, and all are queued
    before any is waited for, so the engine admits them together. ``prepared``: one
    ``prepare`` for asks that differ only in their expert."""
    planned = [plan(ask, user, prepared=prepared, caller=caller) for ask in asks]
    tickets = _submit(planned[0].engine, [pending.request for pending in planned])
    for pending, ticket in zip(planned, tickets, strict=True):
        pending.ticket = ticket
    return [pending.answer() for pending in planned]


def _submit(engine, requests):
    """Queue requests together: Overloaded (503) when the engine has no room for them now,
    BadRequest when one could never fit."""
    try:
        return engine.submit_together(
            requests, deadline_s=settings.LATENTRY_REQUEST_TIMEOUT_S or None
        )
    except TooLarge as exc:
        raise BadRequest(str(exc)) from None


def plan(ask, user, on_text=None, prepared=None, caller=None):
    """Everything before queueing: the prompt, the expert chosen, the request to generate.
    ``caller`` (``registry.auth.caller``) is whom the engine bounds the cache columns of."""
    loaded, ids = prepared or prepare(ask)
    started = time.perf_counter()
    choice, expert = pick(loaded, ask, ids, user)
    routing_ms = (time.perf_counter() - started) * 1000
    stream = TextStream(loaded.tokenizer, ask.stop, on_text)
    request = Request(
        prompt_ids=ids,
        expert=expert,
        max_new_tokens=ask.max_new_tokens,
        temperature=ask.temperature,
        top_p=ask.top_p,
        seed=ask.seed,
        on_token=stream.push,
        caller=caller,
    )
    return Pending(loaded.engine, request, stream, choice, routing_ms)


@dataclass
class Pending:
    engine: object
    request: Request
    stream: "TextStream"
    choice: choose.Choice
    routing_ms: float
    ticket: object = None
    holding: str | None = None  # the caller whose fair use it holds (``admit``), until ``close``
    api_key: object = None  # whose usage it counts toward

    def submit(self):
        (self.ticket,) = _submit(self.engine, [self.request])
        return self

    def cancel(self):
        """The caller went away: its row ends at the engine's next step."""
        if self.ticket is not None:
            self.ticket.cancel()

    async def admitted(self):
        """Wait until the engine admits the request (a stream starts only then, so that a
        refusal is a status); Overloaded if it was not, and what it held is given back."""
        try:
            await asyncio.wrap_future(self.ticket.admission)
        except BaseException:
            await self.close()
            raise

    async def events(self, live=True):
        """What happens to the request, in order: pieces of its text (str) as they are
        generated (``live``: the caller passes them on; otherwise none are given); ``Retry``
        when its expert broke the row before any text went out, after which the plain model's
        text comes the same way; last, the ``Answer``. Raises
        GenerationFailed when the row failed otherwise, Overloaded when the retry found no
        room. However it ends, the row is dropped and what the request held given back."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def nudge(*_):  # from the engine's thread
            loop.call_soon_threadsafe(wake.set)

        self.stream.wake = nudge
        pending, answer, shown = self, None, 0
        try:
            while True:
                pending.ticket.future.add_done_callback(nudge)
                while not pending.ticket.future.done():
                    await wake.wait()
                    wake.clear()
                    self.stream.catch_up()  # the text, here rather than on the engine's thread
                    if live and (piece := self.stream.released(shown)):
                        shown += len(piece)
                        self.stream.delivered = True
                        yield piece
                generation = pending.ticket.future.result()
                if generation.broke_numbers:  # the database, in a thread: only when it must
                    await sync_to_async(pending.reject_if_broken)(generation)
                outcome = pending.outcome(generation)
                if isinstance(outcome, Answer):
                    if live and (piece := self.stream.released(shown)):  # held back to the end
                        yield piece
                    answer = outcome
                    yield answer
                    return
                yield Retry(outcome.choice.reason)
                pending, shown = outcome.submit(), 0
        finally:
            self.stream.wake = None
            pending.cancel()  # also when the caller left: the engine drops its row
            await self.close(answer)

    async def answer_async(self):
        """The Answer, once the generation (and any plain retry) ends: waiting holds no
        thread."""
        async for event in self.events(live=False):
            answer = event
        return answer

    def answer(self):
        """``answer_async`` for synchronous callers."""
        return async_to_sync(self.answer_async)()

    async def close(self, answer=None):
        """Drop the row if it still runs, and give back, once, the caller's fair use (charged
        with what was generated); count the API key's usage."""
        self.cancel()
        if self.holding is None:
            return
        caller, self.holding = self.holding, None
        await sync_to_async(self._give_back)(caller, answer)  # one trip to a thread

    def _give_back(self, caller, answer):
        generated = answer.completion_tokens if answer else 0
        fair_use.release(caller, generated)
        if answer and self.api_key is not None:
            Usage.record(self.api_key, answer.prompt_tokens, generated)

    def reject_if_broken(self, generation):
        """Reject the version whose expert broke the row's numbers (its rows are served plain,
        flagged): the same bytes would break the next request's alike."""
        version = self.choice.version
        if self.request.expert is None or version is None or not generation.broke_numbers:
            return
        version.reject(f"while serving, {NOT_FINITE}: its values overflow the base model")

    def outcome(self, generation):
        """The Answer of a finished generation, or, when the expert broke the row after its
        prefill and nothing reached the caller yet, the plain request to serve instead."""
        retry = not self.stream.delivered
        if generation.finish_reason == "error" and self.request.expert and retry:
            self.stream.reset()
            plain = dataclasses.replace(
                self, request=dataclasses.replace(self.request, expert=None)
            )
            reason = f"{self.choice.name}: the expert failed ({generation.error})"
            plain.choice = choose.Choice(score=self.choice.score, reason=reason)
            return plain
        self.stream.finish()
        timings = {f"{k.removesuffix('_s')}_ms": v * 1000 for k, v in generation.timings.items()}
        augmented = self.request.expert is not None and not generation.degraded
        reason = ""
        if not augmented:
            reason = f"{self.choice.name}: {generation.degraded}" if generation.degraded else ""
            reason = reason or self.choice.reason
        token_ids, finish_reason = generation.token_ids, _finish_reason(generation)
        if self.stream.stopped_at is not None:  # the row may have run on while it was found
            token_ids, finish_reason = token_ids[: self.stream.stopped_at], "stop"
        return Answer(
            text=self.stream.text,
            token_ids=token_ids,
            completion_tokens=len(token_ids),
            finish_reason=finish_reason,
            expert=self.choice.name if augmented else None,
            augmented=augmented,
            reason=reason,
            score=self.choice.score,
            prompt_tokens=len(self.request.prompt_ids),
            timings_ms={"routing_ms": self.routing_ms, **timings},
        )


class GenerationFailed(RuntimeError):
    """The server failed while generating (500; in a stream, an error event)."""


def _finish_reason(generation):
    """OpenAI's finish reasons: a row ended by its deadline ran out of length; one ended by
    an error is the server's failure."""
    if generation.finish_reason == "error":
        raise GenerationFailed(generation.error or "generation failed")
    if generation.finish_reason == "deadline":
        return "length"
    if generation.finish_reason == "cancelled":  # nobody reads it: the caller went away
        return "stop"
    return generation.finish_reason


def attach(ask, user):
    """What an expert writes into the cache for a prompt, for callers who run their own decoder.

    Returns (Choice, tensors or None, prompt_ids). A static prefix comes as ``prefix.keys`` and
    ``prefix.values`` (layers, kv_heads, P, head_dim), D's cache in front of the prompt, whose
    positions then start at P, and ``prefix.gate_bias`` (P,) added to every query's attention
    scores for them. ``latents`` (L, H) go into the cache before the prompt's last token, at
    that token's position, with ``gate_bias`` (L,) likewise.
    """
    loaded, ids = prepare(dataclasses.replace(ask, max_new_tokens=0))
    choice, expert = pick(loaded, ask, ids, user)
    if expert is None:
        return choice, None, ids
    tensors = {}
    if expert.prefix is not None:
        tensors["prefix.keys"] = expert.prefix.keys
        tensors["prefix.values"] = expert.prefix.values
        tensors["prefix.gate_bias"] = expert.prefix.gate
    if expert.has_coprocessor:
        tensors["latents"], tensors["gate_bias"] = prompt_latents(loaded.decoder, expert, ids)
    return choice, {k: v.detach().float().cpu() for k, v in tensors.items()}, ids


class TextStream:
    """A request's token ids to text, made off the engine's thread.

    The engine only records each id (``push``: an append and a nudge, whatever the length so
    far). Whoever waits for the request (``Pending.events``) turns them into text with
    ``catch_up``, incrementally (only the ids since the last text that decoded cleanly, as
    vLLM's and TGI's detokenizers do: merged bytes come out right), releases what is decided,
    and finds the stop strings: the row then ends at its next token (``push`` answers True),
    and the text and the counted tokens end where the stop string began."""

    def __init__(self, tokenizer, stops, on_text):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.on_text = on_text
        self.wake = None  # told when ids arrive (``Pending.events``)
        self.reset()

    def reset(self):
        """Start again (nothing was delivered yet)."""
        self.ids = []
        self.prefix_offset = self.read_offset = 0  # ids[:read_offset] are text
        self.text = ""
        self.sent = 0  # the text released so far: decided, never changed by later ids
        self.delivered = False  # whether any of it reached the caller
        self.stopped_at = None  # the ids that made the text up to a stop string, once found

    def push(self, token_id):
        """On the engine's thread: record the id; True once a stop string was found."""
        self.ids.append(token_id)
        if self.wake is not None:
            self.wake()
        return self.stopped_at is not None

    def catch_up(self, final=False):
        """Turn the ids that arrived into text, the fewest ids at a time that make whole
        characters (so that a stop string is pinned to the id that completed it), look for
        the stop strings, release what is decided. ``final``: the ids are all there, so a
        character cut short comes out as it decodes."""
        count = len(self.ids)
        while self.stopped_at is None and self.read_offset < count:
            window = self.ids[self.prefix_offset : count]
            done = self.read_offset - self.prefix_offset
            before = self.tokenizer.decode(window[:done], skip_special_tokens=True)
            for end in range(done + 1, len(window) + 1):
                after = self.tokenizer.decode(window[:end], skip_special_tokens=True)
                whole = len(after) > len(before) and not after.endswith("\ufffd")
                if whole or (final and end == len(window)):
                    break
            else:
                break  # a character's bytes are not all here yet
            seen = len(self.text)
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, self.prefix_offset + end
            self._find_stop(seen)
        # Hold back what could be the start of a stop string until it is decided.
        hold = 0 if self.stopped_at else max((len(s) - 1 for s in self.stops), default=0)
        self._send(len(self.text) - hold)

    def finish(self):
        self.catch_up(final=True)
        self._send(len(self.text))

    def released(self, start):
        """The released text from ``start`` on."""
        return self.text[start : self.sent]

    def _find_stop(self, seen):
        """Cut the text at a stop string that the text after ``seen`` completed."""
        longest = max((len(s) for s in self.stops), default=0)
        search_from = max(0, seen - longest + 1)
        found = [at for stop in self.stops if (at := self.text.find(stop, search_from)) != -1]
        if found:
            self.text = self.text[: min(found)]
            self.stopped_at = self.read_offset

    def _send(self, upto):
        if upto <= self.sent:
            return
        if self.on_text is not None:
            self.on_text(self.text[self.sent : upto])
            self.delivered = True
        self.sent = upto
