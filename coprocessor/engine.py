"""A serving engine over one decoder: iteration-level (continuous) batching with admission
control.

One thread runs the loop. At every iteration it admits waiting requests, prefills them
together and joins them to running rows, then decodes one token for every running row and
retires the rows that end. No request waits for another's answer before its own prefill
starts; a request that cannot be admitted waits in a bounded queue, for at most its queue
timeout.

Memory. A batch's cache is one tensor per layer, rows x padded width (``RunningBatch``): every
row is as wide as the widest, plus room for the most tokens any row still makes. So the
kv-cache budget counts exactly that, summed over batches (``Footprint``): what the tensors
really hold, padding included. One near-context prompt in a batch of short rows would make
every row that wide; instead the engine runs up to ``Limits.batches`` batches side by side
(one forward of D each per step): a request joins the batch where it adds the fewest
columns when the budget holds that, else starts a batch of its own, so a long row costs its
own columns and the short rows keep theirs. Batches merge again as soon as the budget holds
them merged (a forward costs more than padding does while memory is there).

A prompt longer than ``Limits.prefill_chunk`` tokens is prefilled a slice per iteration
(chunked prefill, ``generate.ChunkedPrefill``), in a batch of its own that it joins when its
prompt is cached: while other rows decode, the slices take at most ``Limits.prefill_share`` of
the loop's time, so one near-context prompt slows the running rows by at most
1 / (1 - share) instead of stopping them for its whole prefill. It counts as a batch and as a
row, and its columns are in the budget, from its admission.

Admission, oldest first, within the row count, the budget and the prompt tokens one
prefill may take. A request whose caller (``Request.caller``) already holds
``Limits.caller_columns`` in running rows waits for its own earlier rows while others pass
it; one that does not fit the budget now may be overtaken by younger ones that do, but only
for ``Limits.overtake_s``: after that nothing passes it, so it is not starved.

Failures stay with their rows: an expert that fails is dropped for its own rows
(``RunningBatch``); a caller's callback that raises ends its own row; anything else that goes
wrong in an iteration ends the rows running then, and the loop goes on.
"""

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from .generate import ChunkedPrefill, Generation, RunningBatch

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The request was not admitted (the queue is full, or it waited past its queue timeout);
    ``retry_after_s`` suggests when to try again."""

    def __init__(self, message, retry_after_s):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooLarge(ValueError):
    """The request alone needs more cache than the engine's whole budget."""


@dataclass(eq=False)
class Ticket:
    """A submitted request: ``future`` gives its Generation (or raises Overloaded);
    ``admission`` is done once it leaves the queue (True: admitted; or Overloaded, or False when
    cancelled there), so that a stream can answer 503 before it starts; ``cancel()`` ends it at
    the next iteration, queued or running."""

    request: object
    queue_deadline: float  # time.monotonic() by which it must be admitted
    deadline: float | None  # time.monotonic() by which it must end, or None
    future: Future = field(default_factory=Future)
    admission: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    prefilled: float | None = None  # its first token was chosen then
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self):
        self.cancelled.set()


@dataclass
class Limits:
    max_rows: int = 32  # rows decoded together, in all batches
    # kv-cache budget, in cache columns: what the batches' caches hold at their peak, each
    # batch rows x (widest row + most tokens any row still makes), summed over batches
    cache_columns: int = 32768
    max_waiting: int = 256  # requests queued beyond the running batches
    queue_timeout_s: float = 30.0  # how long a request may wait to be admitted
    prefill_tokens: int = 4096  # prompt tokens prefilled in one iteration (one prompt at least)
    batches: int = 2  # batches decoded side by side; each costs one forward of D per step
    # Cache columns (its own: prefix, prompt, latents and new tokens) that one caller's
    # running rows may hold; a request alone over it still runs when its caller has nothing
    # else running. 0: no bound.
    caller_columns: int = 16384
    # How long a request that does not fit may be overtaken by younger ones that do; keep it
    # well under queue_timeout_s, or a long prompt may never get in.
    overtake_s: float = 5.0
    # A prompt longer than this is prefilled this many tokens per iteration, in a batch of its
    # own (chunked prefill); 0: every prompt in one forward.
    prefill_chunk: int = 256
    # The share of the loop's time those slices may take while other rows decode: the running
    # rows slow by at most 1 / (1 - share) beside a long prompt.
    prefill_share: float = 0.25

    def __post_init__(self):
        if self.batches < 1:
            raise ValueError(f"an engine needs at least one batch (batches={self.batches})")
        if not 0 < self.prefill_share <= 1:
            raise ValueError(f"prefill_share is a share of time in (0, 1] ({self.prefill_share})")


@dataclass(frozen=True)
class Footprint:
    """What one batch's cache holds at its peak (``RunningBatch._keep``): every row padded to
    the widest, plus room for the most new tokens any row still has to make."""

    rows: int = 0
    width: int = 0
    to_go: int = 0

    @classmethod
    def of(cls, batch):
        to_go = max((r.request.max_new_tokens - len(r.tokens) for r in batch.rows), default=0)
        return cls(len(batch.rows), batch.width, to_go)

    @property
    def columns(self):
        return self.rows * (self.width + self.to_go)

    def joined(self, request):
        """The footprint with ``request``'s row in it (its prompt, prefix and latents wide)."""
        width = request.cache_columns() - request.max_new_tokens
        return Footprint(
            self.rows + 1, max(self.width, width), max(self.to_go, request.max_new_tokens)
        )

    def merged(self, other):
        return Footprint(
            self.rows + other.rows, max(self.width, other.width), max(self.to_go, other.to_go)
        )


class Engine:
    def __init__(self, decoder, eos_token_id, limits=None):
        self.decoder = decoder
        self.eos_token_id = eos_token_id
        self.batches = []  # RunningBatches, none empty between iterations
        self.prefills = []  # ChunkedPrefills of long prompts, oldest first
        self.owed_s = 0.0  # decode time the running rows get before the next prefill slice
        self.limits = limits or Limits()
        self.waiting = []  # Tickets, oldest first
        self.condition = threading.Condition()
        self.closed = False
        self.thread = None
        self.admitted_sizes = collections.deque(maxlen=1000)  # recent admissions, for benches

    # --- the callers' side ----------------------------------------------------------------

    def submit(self, request, *, deadline_s=None):
        """Queue a ``generate.Request``; returns its Ticket. Overloaded when the queue is full;
        TooLarge when the request could never fit the cache budget."""
        return self.submit_together([request], deadline_s=deadline_s)[0]

    def submit_together(self, requests, *, deadline_s=None):
        """Queue requests as one step, so that they are admitted in the same iteration when
        they fit (all or none are queued)."""
        for request in requests:
            needed = request.cache_columns()
            if needed > self.limits.cache_columns:
                raise TooLarge(
                    f"the request needs {needed} cache positions; this server's budget is "
                    f"{self.limits.cache_columns}"
                )
        now = time.monotonic()
        tickets = [
            Ticket(
                request,
                queue_deadline=now + self.limits.queue_timeout_s,
                deadline=None if deadline_s is None else now + deadline_s,
            )
            for request in requests
        ]
        with self.condition:
            if self.closed:
                raise RuntimeError("this base model was reloaded; send the request again")
            if len(self.waiting) + len(tickets) > self.limits.max_waiting:
                raise Overloaded(
                    f"the queue is full ({self.limits.max_waiting} requests waiting)",
                    self.retry_after_s(),
                )
            self.waiting += tickets
            self._ensure_running()
            self.condition.notify()
        return tickets

    def retry_after_s(self):
        return max(1, round(self.limits.queue_timeout_s / 4))

    def stop(self, wait_s=None):
        """Serve what is queued and running, then end; later submits are refused. With
        ``wait_s``, wait up to that long for the loop to end: a process about to exit must,
        since a thread still inside torch when the interpreter ends aborts it."""
        with self.condition:
            self.closed = True
            self.condition.notify()
        if wait_s is not None and self.thread is not None:
            self.thread.join(wait_s)

    def load(self):
        """(running rows, waiting requests), for health checks and benches."""
        with self.condition:
            return len(self.rows()), len(self.waiting)

    def rows(self):
        """The running rows, in all batches, and the long prompts being prefilled."""
        return [row for batch in self.batches for row in batch.rows] + [
            prefill.row for prefill in self.prefills
        ]

    def cache_columns(self):
        """The cache columns the running batches hold at their peak, and those the long
        prompts being prefilled will (what the budget counts)."""
        return sum(f.columns for f in self._footprints() + self._reserved())

    def _footprints(self):
        return [Footprint.of(batch) for batch in self.batches]

    def _reserved(self):
        """The footprints of the batches the long prompts being prefilled will be."""
        return [Footprint().joined(prefill.row.request) for prefill in self.prefills]

    def _ensure_running(self):
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
            self.thread.start()

    # --- the loop -------------------------------------------------------------------------

    def _run(self):
        while True:
            with self.condition:
                while not (self.waiting or self.batches or self.prefills or self.closed):
                    self.condition.wait()
                if self.closed and not (self.waiting or self.batches or self.prefills):
                    return
            try:
                self.iterate()
            except Exception:  # the loop outlives any iteration: its running rows end
                log.exception("engine iteration failed")
                self._fail_running("the server failed while generating")

    def iterate(self):
        """One iteration: drop what was cancelled or is late, admit, decode one token in
        every batch, prefill a slice of a long prompt when it is its turn, then merge batches
        the budget holds merged."""
        now = time.monotonic()
        self._end_running(now)
        admitted = self._admissible(now)
        if admitted:
            self.admitted_sizes.append(len(admitted))
            self._admit(admitted)
        started = time.monotonic()
        for batch in self.batches:
            self._finish(batch.step())
        self.owed_s -= time.monotonic() - started
        self._advance_prefill()
        self._merge_batches()

    def _admit(self, admitted):
        """Prefill the admitted tickets, each group with the batch it joins (or starts)."""
        started = time.monotonic()
        groups = {}
        for ticket, index in admitted:
            ticket.admitted = started
            _settle(ticket.admission, True)
            groups.setdefault(index, []).append(ticket)
        for ticket in groups.pop(None, []):  # long prompts: prefilled a slice at a time
            try:
                self.prefills.append(
                    ChunkedPrefill(self.decoder, self.eos_token_id, ticket.request, ticket)
                )
            except Exception as exc:
                log.exception("prefill failed")
                _settle(ticket.future, Generation([], "error", error=str(exc)))
        for index, tickets in sorted(groups.items()):
            if index == len(self.batches):
                self.batches.append(RunningBatch(self.decoder, self.eos_token_id))
            try:
                ended = self.batches[index].admit([t.request for t in tickets], tags=tickets)
            except Exception as exc:  # plain D failed on these prompts: they alone end
                log.exception("prefill failed")
                for ticket in tickets:
                    _settle(ticket.future, Generation([], "error", error=str(exc)))
                ended = []
            for ticket in tickets:
                ticket.prefilled = time.monotonic()
            self._finish(ended)
        self.batches = [batch for batch in self.batches if batch.rows]

    def _advance_prefill(self):
        """A slice of the oldest long prompt's prefill, when no row is decoding or the
        running rows have had their share of the time since the last slice; a prompt whose
        cache is complete joins as a batch of its own."""
        if not self.prefills:
            self.owed_s = 0.0
            return
        if self.batches and self.owed_s > 0:
            return
        prefill = self.prefills[0]
        started = time.monotonic()
        try:
            done = prefill.advance(self.limits.prefill_chunk)
            batch, ended = prefill.join() if done else (None, [])
        except Exception as exc:  # plain D failed on this prompt: it alone ends
            log.exception("prefill failed")
            self.prefills.pop(0)
            prefill.row.end("error", str(exc))
            self._finish([prefill.row])
            return
        share = self.limits.prefill_share
        self.owed_s = (time.monotonic() - started) * (1 - share) / share if self.batches else 0.0
        if done:
            self.prefills.pop(0)
            prefill.row.tag.prefilled = time.monotonic()
            self._finish(ended)
            if batch.rows:
                self.batches.append(batch)

    def _end_running(self, now):
        for batch in self.batches:
            for row in batch.rows:
                _end_if_unwanted(row, now)
            self._finish(batch.retire())
        self.batches = [batch for batch in self.batches if batch.rows]
        for prefill in self.prefills:
            _end_if_unwanted(prefill.row, now)
        self._finish([prefill.row for prefill in self.prefills if prefill.row.finish_reason])
        self.prefills = [prefill for prefill in self.prefills if not prefill.row.finish_reason]

    def _admissible(self, now):
        """[(ticket, batch index)] taken from the waiting tickets, oldest first, within the
        limits; an index past the running batches starts a new one."""
        limits = self.limits
        footprints, reserved = self._footprints(), self._reserved()
        held = self._columns_by_caller()
        running = len(self.rows())
        taken = []
        with self.condition:
            self.waiting = self._drop_cancelled_and_late(now)
            prompt_tokens = 0
            kept = []
            for at, ticket in enumerate(self.waiting):
                request = ticket.request
                if running + len(taken) >= limits.max_rows:
                    kept += self.waiting[at:]
                    break
                if self._caller_holds_enough(request, held):
                    kept.append(ticket)  # its caller's running rows end first; others pass
                    continue
                chunked = self._chunked(request)
                if (
                    not chunked
                    and taken
                    and prompt_tokens + len(request.prompt_ids) > limits.prefill_tokens
                ):
                    kept.append(ticket)  # the next iteration's prefill (it is older: first)
                    continue
                index = self._place(footprints, reserved, request, own_batch=chunked)
                if index is None:
                    kept.append(ticket)
                    if now - ticket.submitted >= limits.overtake_s:
                        kept += self.waiting[at + 1 :]  # it waited enough: nothing passes it
                        break
                    continue
                if chunked:
                    reserved.append(Footprint().joined(request))
                    index = None  # ``_admit``: a ChunkedPrefill, then a batch of its own
                else:
                    if index == len(footprints):
                        footprints.append(Footprint())
                    footprints[index] = footprints[index].joined(request)
                    prompt_tokens += len(request.prompt_ids)
                if request.caller is not None:
                    held[request.caller] += request.cache_columns()
                taken.append((ticket, index))
            self.waiting = kept
        return taken

    def _drop_cancelled_and_late(self, now):
        """The waiting tickets still wanted; those cancelled or past their queue deadline are
        settled."""
        kept = []
        for ticket in self.waiting:
            if ticket.cancelled.is_set():
                _settle(ticket.admission, False)
                _settle(ticket.future, Generation([], "cancelled"))
            elif now >= ticket.queue_deadline:
                late = f"not admitted within {self.limits.queue_timeout_s:g} s"
                for future in (ticket.admission, ticket.future):
                    _settle(future, error=Overloaded(late, self.retry_after_s()))
            else:
                kept.append(ticket)
        return kept

    def _chunked(self, request):
        """Whether ``request``'s prompt is prefilled a slice at a time."""
        chunk = self.limits.prefill_chunk
        return bool(chunk) and len(request.prompt_ids) - 1 > chunk

    def _place(self, footprints, reserved, request, own_batch=False):
        """Where ``request`` goes within the budget: the batch where it adds the fewest
        columns (unless it needs ``own_batch``), else a new batch (while fewer than
        ``Limits.batches`` run, counting the ``reserved`` ones of long prompts being
        prefilled), else None."""
        total = sum(footprint.columns for footprint in footprints + reserved)
        budget = self.limits.cache_columns
        if footprints and not own_batch:
            added, index = min(
                (f.joined(request).columns - f.columns, i) for i, f in enumerate(footprints)
            )
            if total + added <= budget:
                return index
        batches = len(footprints) + len(reserved)
        if batches < self.limits.batches and total + request.cache_columns() <= budget:
            return len(footprints)
        return None

    def _columns_by_caller(self):
        """Each caller's cache columns in running rows (their own, not the padding)."""
        held = collections.Counter()
        for row in self.rows():
            if row.request.caller is not None:
                held[row.request.caller] += row.request.cache_columns()
        return held

    def _caller_holds_enough(self, request, held):
        bound = self.limits.caller_columns
        if not bound or request.caller is None or not held[request.caller]:
            return False
        return held[request.caller] + request.cache_columns() > bound

    def _merge_batches(self):
        """Fold two batches into one while the budget holds them merged: each batch costs a
        forward of D per step; padding costs only memory."""
        self.batches = [batch for batch in self.batches if batch.rows]
        while len(self.batches) > 1:
            footprints = [Footprint.of(batch) for batch in self.batches]
            added, i, j = min(
                (a.merged(b).columns - a.columns - b.columns, i, j)
                for i, a in enumerate(footprints)
                for j, b in enumerate(footprints)
                if i < j
            )
            reserved = sum(f.columns for f in self._reserved())
            if sum(f.columns for f in footprints) + reserved + added > self.limits.cache_columns:
                return
            self.batches[i].absorb(self.batches.pop(j))

    def _finish(self, rows):
        now = time.monotonic()
        for row in rows:
            ticket = row.tag
            prefilled = ticket.prefilled or now  # a row ended while its prompt was prefilled
            timings = {
                "queue_s": ticket.admitted - ticket.submitted,
                "prefill_s": prefilled - ticket.admitted,
                "decode_s": now - prefilled,
            }
            _settle(ticket.future, row.generation(timings))

    def _fail_running(self, message):
        for batch in self.batches:
            for row in batch.rows:
                row.end("error", message)
            self._finish(batch.retire())
        self.batches = []
        for prefill in self.prefills:
            prefill.row.end("error", message)
        self._finish([prefill.row for prefill in self.prefills])
        self.prefills = []


def _end_if_unwanted(row, now):
    """End a row its caller cancelled or whose deadline passed."""
    ticket = row.tag
    if ticket.cancelled.is_set():
        row.end("cancelled")
    elif ticket.deadline is not None and now >= ticket.deadline:
        row.end("deadline")


def _settle(future, result=None, error=None):
    """Give a ticket its outcome, unless its caller gave up on the Future itself."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
