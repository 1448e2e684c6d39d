"""A serving engine over one decoder: iteration-level (continuous) batching with admission
control.

One thread runs the loop. At every iteration it admits waiting requests, oldest first, while
the running batch stays within its row count and its kv-cache budget (in cache columns summed
over rows, padding included), prefills them together and joins them to the running rows
(``generate.RunningBatch``), then decodes one token for every running row and retires the rows
that end. No request waits for another's answer before its own prefill starts; a request that
cannot be admitted waits in a bounded queue, for at most its queue timeout.

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

from .generate import Generation, RunningBatch

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
    max_rows: int = 32  # rows decoded together
    cache_columns: int = 32768  # kv-cache budget: rows x padded width at the batch's peak
    max_waiting: int = 256  # requests queued beyond the running batch
    queue_timeout_s: float = 30.0  # how long a request may wait to be admitted
    prefill_tokens: int = 4096  # prompt tokens prefilled in one iteration (one at least)


class Engine:
    def __init__(self, decoder, eos_token_id, limits=None):
        self.batch = RunningBatch(decoder, eos_token_id)
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

    def stop(self):
        """Serve what is queued and running, then end; later submits are refused."""
        with self.condition:
            self.closed = True
            self.condition.notify()

    def load(self):
        """(running rows, waiting requests), for health checks and benches."""
        with self.condition:
            return len(self.batch.rows), len(self.waiting)

    def _ensure_running(self):
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
            self.thread.start()

    # --- the loop -------------------------------------------------------------------------

    def _run(self):
        while True:
            with self.condition:
                while not (self.waiting or self.batch.rows or self.closed):
                    self.condition.wait()
                if self.closed and not (self.waiting or self.batch.rows):
                    return
            try:
                self.iterate()
            except Exception:  # the loop outlives any iteration: its running rows end
                log.exception("engine iteration failed")
                self._fail_running("the server failed while generating")

    def iterate(self):
        """One iteration: drop what was cancelled or is late, admit, decode one token."""
        now = time.monotonic()
        self._end_running(now)
        admitted = self._admissible(now)
        if admitted:
            started = time.monotonic()
            self.admitted_sizes.append(len(admitted))
            for ticket in admitted:
                ticket.admitted = started
                _settle(ticket.admission, True)
            try:
                ended = self.batch.admit([t.request for t in admitted], tags=admitted)
            except Exception as exc:  # plain D failed on these prompts: they alone end
                log.exception("prefill failed")
                for ticket in admitted:
                    _settle(ticket.future, Generation([], "error", error=str(exc)))
                ended = []
            for ticket in admitted:
                ticket.prefilled = time.monotonic()
            self._finish(ended)
        self._finish(self.batch.step())

    def _end_running(self, now):
        for row in self.batch.rows:
            ticket = row.tag
            if ticket.cancelled.is_set():
                row.end("cancelled")
            elif ticket.deadline is not None and now >= ticket.deadline:
                row.end("deadline")
        self._finish(self.batch.retire())

    def _admissible(self, now):
        """Take waiting tickets, oldest first, while the batch stays within its limits."""
        limits = self.limits
        taken = []
        with self.condition:
            kept = []
            for ticket in self.waiting:
                if ticket.cancelled.is_set():
                    _settle(ticket.admission, False)
                    _settle(ticket.future, Generation([], "cancelled"))
                elif now >= ticket.queue_deadline:
                    late = f"not admitted within {limits.queue_timeout_s:g} s"
                    for future in (ticket.admission, ticket.future):
                        _settle(future, error=Overloaded(late, self.retry_after_s()))
                else:
                    kept.append(ticket)
            self.waiting = kept
            prompt_tokens = 0
            while self.waiting and len(self.batch.rows) + len(taken) < limits.max_rows:
                ticket = self.waiting[0]
                prompt_tokens += len(ticket.request.prompt_ids)
                if taken and prompt_tokens > limits.prefill_tokens:
                    break
                if self._peak_columns(taken + [ticket]) > limits.cache_columns:
                    break  # oldest first: a large request is not overtaken forever
                taken.append(self.waiting.pop(0))
        return taken

    def _peak_columns(self, joining):
        """Cache columns (rows x padded width) at the batch's peak if ``joining`` were admitted:
        the widest row now or joining, plus the most new tokens any row still has to make."""
        rows = self.batch.rows
        requests = [t.request for t in joining]
        width = max([self.batch.width] + [r.cache_columns() - r.max_new_tokens for r in requests])
        to_go = max(
            [row.request.max_new_tokens - len(row.tokens) for row in rows]
            + [r.max_new_tokens for r in requests]
        )
        return (len(rows) + len(requests)) * (width + to_go)

    def _finish(self, rows):
        now = time.monotonic()
        for row in rows:
            ticket = row.tag
            timings = {
                "queue_s": ticket.admitted - ticket.submitted,
                "prefill_s": ticket.prefilled - ticket.admitted,
                "decode_s": now - ticket.prefilled,
            }
            _settle(ticket.future, row.generation(timings))

    def _fail_running(self, message):
        for row in self.batch.rows:
            row.end("error", message)
        self._finish(self.batch.retire())


def _settle(future, result=None, error=None):
    """Give a ticket its outcome, unless its caller gave up on the Future itself."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
