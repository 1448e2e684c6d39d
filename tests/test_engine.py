"""The serving engine: rows join and leave between steps with outputs unchanged, admission
stays within the cache budget, and a broken expert ends only its own rows."""

import threading
import time

import pytest
import torch

from coprocessor.engine import Engine, Limits, Overloaded, Ticket, TooLarge
from coprocessor.expert import Coprocessor, CoprocessorConfig
from coprocessor.generate import ChunkedPrefill, Request, RunningBatch, generate
from tests.factories import FAMILIES, frozen, prefix_expert, randomize, wait_for


def lora_expert(model, seed=1, n_latents=3):
    return randomize(Coprocessor(model, CoprocessorConfig(n_latents=n_latents, lora_rank=2)), seed)


def alone(model, request):
    return generate(model, [request])[0].token_ids


def plain(request):
    return Request(**{**request.__dict__, "expert": None, "on_token": None})


def serve(engine, requests):
    tickets = [engine.submit(r) for r in requests]
    return [t.future.result(timeout=60) for t in tickets]


@pytest.fixture
def model():
    return frozen(FAMILIES["llama"])


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_that_join_a_running_batch_generate_what_they_would_alone(family):
    model = frozen(FAMILIES[family])
    engine = Engine(model, eos_token_id=None)
    experts = [lora_expert(model, 1), prefix_expert(model, seed=2), None]
    late = [
        Request([12, 5, 33], expert=experts[0], max_new_tokens=6),
        Request([7, 7], expert=None, max_new_tokens=9, temperature=0.9, seed=3),
        Request(
            [1, 2, 3, 4, 5, 6, 7], expert=experts[1], max_new_tokens=5, temperature=1.1, seed=4
        ),
    ]
    joined = []

    def join_after_three(token):
        if len(joined) == 0 and len(first_tokens) == 2:  # from inside the loop, mid-generation
            joined.extend(engine.submit(r) for r in late)
        first_tokens.append(token)

    first_tokens = []
    first = Request([3, 8, 1, 9], expert=experts[1], max_new_tokens=12, on_token=join_after_three)
    first_ticket = engine.submit(first)
    outcome = first_ticket.future.result(timeout=60)
    outputs = [t.future.result(timeout=60) for t in joined]
    assert outcome.token_ids == alone(model, Request([3, 8, 1, 9], experts[1], 12))
    assert [o.token_ids for o in outputs] == [alone(model, r) for r in late]
    # They were admitted while the first was still generating, not after it.
    first_ended = first_ticket.prefilled + outcome.timings["decode_s"]
    assert all(t.admitted < first_ended for t in joined)


def test_a_full_queue_and_a_late_request_answer_overloaded(model):
    engine = Engine(model, None, Limits(max_rows=1, max_waiting=1, queue_timeout_s=0.3))
    release = threading.Event()
    busy = engine.submit(
        Request([1, 2], max_new_tokens=50, on_token=lambda t: release.wait(5) and False)
    )
    wait_for(lambda: busy.admitted, what="the first request running")
    queued = engine.submit(Request([3, 4], max_new_tokens=2))
    with pytest.raises(Overloaded) as refused:
        engine.submit(Request([5, 6], max_new_tokens=2))
    assert "queue is full" in str(refused.value) and refused.value.retry_after_s >= 1
    with pytest.raises(Overloaded, match="not admitted within"):
        queued.future.result(timeout=10)
    with pytest.raises(Overloaded):
        queued.admission.result(timeout=1)
    release.set()
    assert busy.future.result(timeout=30).finish_reason == "length"


def test_a_request_larger_than_the_whole_cache_budget_is_refused(model):
    engine = Engine(model, None, Limits(cache_columns=20))
    with pytest.raises(TooLarge, match="needs 25 cache positions"):
        engine.submit(Request([1] * 5, max_new_tokens=20))


def test_the_running_batch_stays_within_its_cache_budget(model, monkeypatch):
    limits = Limits(max_rows=16, cache_columns=60)
    engine = Engine(model, None, limits)
    peaks = []
    step = RunningBatch.step

    def recording_step(batch):
        peaks.append(len(batch.rows) * batch.width)
        return step(batch)

    monkeypatch.setattr(RunningBatch, "step", recording_step)
    requests = [Request([i + 1] * (2 + i % 5), max_new_tokens=8 + i % 7) for i in range(12)]
    outputs = serve(engine, requests)
    assert [o.token_ids for o in outputs] == [alone(model, r) for r in requests]
    assert max(peaks) <= limits.cache_columns
    assert max(peaks) > limits.cache_columns // 2  # it did batch


def test_cancel_and_deadline_end_a_row_and_leave_the_others(model):
    engine = Engine(model, None)

    def pace(token):
        time.sleep(0.01)
        return False

    cancelled = engine.submit(Request([1, 2, 3], max_new_tokens=200, on_token=pace))
    late = engine.submit(Request([4, 5], max_new_tokens=200, on_token=pace), deadline_s=0.2)
    other = Request([6, 7, 8], max_new_tokens=30)
    other_ticket = engine.submit(other)
    wait_for(lambda: cancelled.admitted, what="admission")
    cancelled.cancel()
    assert cancelled.future.result(timeout=30).finish_reason == "cancelled"
    assert late.future.result(timeout=30).finish_reason == "deadline"
    assert other_ticket.future.result(timeout=30).token_ids == alone(model, other)


def nan_weights(expert):
    with torch.no_grad():
        next(p for p in expert.parameters() if p.numel() > 1).fill_(float("nan"))
    return expert


def raising(expert):
    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    if expert.has_coprocessor:
        expert.latent_head.forward = fail
    else:
        expert.prefix.keys = None  # batching its prefix raises
    return expert


def raising_in_its_hook(expert):
    """A LoRA delta of the wrong shape: D's forward hook raises on the expert's rows (a prefix
    expert has no hook: its prefix raises instead)."""
    if not expert.has_coprocessor:
        return raising(expert)
    expert.lora_a[0] = torch.zeros(expert.lora_a[0].shape[0], 3)
    return expert


@pytest.mark.parametrize(
    "break_it", [nan_weights, raising, raising_in_its_hook], ids=["nan", "raises", "hook"]
)
@pytest.mark.parametrize("make_broken", [lora_expert, prefix_expert], ids=["lora", "prefix"])
def test_a_broken_expert_ends_only_its_own_rows(model, break_it, make_broken):
    healthy = lora_expert(model, seed=5)
    broken = break_it(make_broken(model, seed=6))
    requests = [
        Request([3, 8, 1, 9], expert=broken, max_new_tokens=6),
        Request([7, 7], expert=None, max_new_tokens=6),
        Request([12, 5, 33], expert=healthy, max_new_tokens=6, temperature=0.8, seed=1),
        Request([4, 6], expert=broken, max_new_tokens=6, temperature=0.9, seed=2),
        Request([9, 2, 2], expert=None, max_new_tokens=6, temperature=1.0, seed=3),
    ]
    for outputs in (generate(model, requests), serve(Engine(model, None), requests)):
        for request, output in zip(requests, outputs, strict=True):
            if request.expert is broken:
                assert output.degraded, "the broken expert's rows say why they are plain"
                assert output.token_ids == alone(model, plain(request))
            else:
                assert not output.degraded
                assert output.token_ids == alone(model, request)


def test_a_callback_that_raises_ends_its_own_row_and_the_loop_goes_on(model):
    engine = Engine(model, None)

    def fail(token):
        raise ValueError("client bug")

    bad = engine.submit(Request([1, 2], max_new_tokens=5, on_token=fail))
    good = Request([3, 4], max_new_tokens=5)
    assert bad.future.result(timeout=30).finish_reason == "error"
    assert engine.submit(good).future.result(timeout=30).token_ids == alone(model, good)


def test_a_bfloat16_decoder_serves_mixed_batches_as_each_alone():
    model = frozen(FAMILIES["llama"]).to(torch.bfloat16)
    requests = [
        Request([3, 8, 1, 9], expert=lora_expert(model, 1), max_new_tokens=5),
        Request([7, 7], max_new_tokens=5),
        Request([12, 5, 33], expert=prefix_expert(model, seed=2), max_new_tokens=5),
    ]
    outputs = serve(Engine(model, None), requests)
    assert [o.token_ids for o in outputs] == [alone(model, r) for r in requests]
    assert not any(o.degraded for o in outputs)


def test_serving_dtype_defaults_by_device_and_refuses_nonsense():
    from coprocessor.base_models import serving_dtype

    assert serving_dtype("cpu") == torch.float32
    assert serving_dtype("cuda:0") == torch.bfloat16
    assert serving_dtype("cpu", "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="not a floating-point"):
        serving_dtype("cpu", "int8")


# --- the budget, long prompts and callers ---------------------------------------------------


def queued(engine, request):
    """Queue a request without starting the engine's thread: the test runs each iteration."""
    ticket = Ticket(request, queue_deadline=time.monotonic() + 600, deadline=None)
    engine.waiting.append(ticket)
    return ticket


def run_out(engine, each=lambda: None):
    while engine.batches or engine.waiting or engine.prefills:
        engine.iterate()
        each()


def allocated_columns(engine):
    """What the batches' cache tensors really hold: rows x (columns and room), per batch."""
    caches = [b.cache for b in engine.batches] + [p.cache for p in engine.prefills]
    return sum(c.layers[0]._keys.shape[0] * c.layers[0]._keys.shape[2] for c in caches)


def long_prompt(length=150):
    return [1 + i % 60 for i in range(length)]


def test_a_long_row_does_not_stop_short_rows_from_being_admitted(model):
    limits = Limits(max_rows=8, cache_columns=300)
    engine = Engine(model, None, limits)
    long = Request(long_prompt(), max_new_tokens=60)  # 210 columns: one such row per budget
    long_ticket = queued(engine, long)
    engine.iterate()
    shorts = [Request([i + 1, 2, 3], max_new_tokens=8) for i in range(7)]
    short_tickets = [queued(engine, r) for r in shorts]
    engine.iterate()
    assert all(t.admitted for t in short_tickets), "short rows join while the long one runs"
    assert not long_ticket.future.done()
    peaks = []
    run_out(engine, lambda: peaks.append((engine.cache_columns(), allocated_columns(engine))))
    assert max(counted for counted, _ in peaks) <= limits.cache_columns
    assert all(allocated <= counted for counted, allocated in peaks), "the budget is real memory"
    assert long_ticket.future.result().token_ids == alone(model, long)
    assert [t.future.result().token_ids for t in short_tickets] == [alone(model, r) for r in shorts]


def test_batches_merge_again_once_the_budget_holds_them_merged(model):
    engine = Engine(model, None, Limits(cache_columns=600))
    long_ticket = queued(engine, Request(long_prompt(), max_new_tokens=60))
    engine.iterate()
    beside = Request([4, 5, 6], max_new_tokens=20)  # fits beside it, padded to its width
    queued(engine, beside)
    engine.iterate()
    apart = Request([7, 8, 9], max_new_tokens=20)  # would not: starts a batch of its own
    apart_ticket = queued(engine, apart)
    engine.iterate()
    assert [len(b.rows) for b in engine.batches] == [2, 1]
    long_ticket.cancel()
    engine.iterate()
    assert [len(b.rows) for b in engine.batches] == [2], "one forward per step again"
    run_out(engine)
    assert apart_ticket.future.result().token_ids == alone(model, apart)


def test_one_callers_columns_in_flight_are_bounded(model):
    engine = Engine(model, None, Limits(caller_columns=40))
    mine = [Request([1, 2, 3, i + 4], max_new_tokens=16, caller="addr:1") for i in range(3)]
    my_tickets = [queued(engine, r) for r in mine]  # 20 columns each: two at a time
    other = queued(engine, Request([5, 6], max_new_tokens=4, caller="user:2"))
    engine.iterate()
    assert [bool(t.admitted) for t in my_tickets] == [True, True, False]
    assert other.admitted, "another caller passes the one that holds enough"

    def held():
        rows = engine.rows()
        return sum(r.request.cache_columns() for r in rows if r.request.caller == "addr:1")

    holding = []
    run_out(engine, lambda: holding.append(held()))
    assert max(holding) <= 40
    assert [t.future.result().token_ids for t in my_tickets] == [alone(model, r) for r in mine]


def test_a_request_alone_over_its_callers_bound_still_runs(model):
    engine = Engine(model, None, Limits(caller_columns=10))
    big = Request([1, 2, 3, 4], max_new_tokens=16, caller="addr:1")
    ticket = queued(engine, big)
    run_out(engine)
    assert ticket.future.result().token_ids == alone(model, big)


@pytest.mark.parametrize("overtake_s, small_passes", [(600, True), (0, False)])
def test_a_request_that_does_not_fit_is_overtaken_only_for_a_while(model, overtake_s, small_passes):
    limits = Limits(cache_columns=100, batches=1, overtake_s=overtake_s)
    engine = Engine(model, None, limits)
    queued(engine, Request(long_prompt(10), max_new_tokens=30))
    engine.iterate()
    big = queued(engine, Request(long_prompt(20), max_new_tokens=50))  # not beside that one
    small = queued(engine, Request([3, 4], max_new_tokens=3))  # would fit
    engine.iterate()
    assert not big.admitted
    assert bool(small.admitted) is small_passes
    run_out(engine)
    assert big.future.result().finish_reason == "length"


def test_an_engine_without_a_batch_is_refused():
    with pytest.raises(ValueError, match="at least one batch"):
        Limits(batches=0)


# --- long prompts, a slice at a time --------------------------------------------------------


def full_expert(model, seed=3):
    config = CoprocessorConfig(n_latents=2, kind="full", prefix_positions=3, seed=seed)
    return randomize(Coprocessor(model, config), seed)


@pytest.mark.parametrize(
    "make_expert",
    [None, lora_expert, prefix_expert, full_expert],
    ids=["plain", "lora", "prefix", "full"],
)
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_prompt_prefilled_a_slice_at_a_time_generates_what_it_would_at_once(
    model, make_expert, temperature
):
    expert = make_expert(model) if make_expert else None
    request = Request(long_prompt(40), expert, 6, temperature=temperature, seed=5)
    prefill = ChunkedPrefill(model, None, request)
    slices = 1
    while not prefill.advance(7):
        slices += 1
    assert slices == 6  # 39 tokens before the last, 7 at a time
    batch, ended = prefill.join()
    while batch.rows:
        ended += batch.step()
    assert ended[0].tokens == alone(model, request)
    assert not ended[0].degraded


@pytest.mark.parametrize("break_it", [nan_weights, raising], ids=["nan", "raises"])
def test_a_broken_expert_on_a_long_prompt_leaves_it_to_plain_d(model, break_it):
    request = Request(long_prompt(30), break_it(prefix_expert(model, seed=6)), 5)
    engine = Engine(model, None, Limits(prefill_chunk=8))
    (output,) = serve(engine, [request])
    assert output.degraded
    assert output.token_ids == alone(model, plain(request))


def test_short_rows_keep_decoding_while_a_long_prompt_is_prefilled(model):
    engine = Engine(model, None, Limits(prefill_chunk=8, prefill_share=1.0))
    order = []
    short = Request([3, 4, 5], max_new_tokens=14, on_token=lambda t: order.append("short"))
    long = Request(long_prompt(60), max_new_tokens=3, on_token=lambda t: order.append("long"))
    short_ticket = queued(engine, short)
    engine.iterate()
    long_ticket = queued(engine, long)
    run_out(engine)
    # 59 tokens before its last, 8 a slice: 8 iterations, each beside a step of the short row
    assert order[: order.index("long")].count("short") == 2 + 8
    assert short_ticket.future.result().token_ids == alone(model, plain(short))
    assert long_ticket.future.result().token_ids == alone(model, plain(long))
    assert long_ticket.future.result().timings["prefill_s"] > 0


def test_slices_take_only_their_share_of_time_while_rows_decode(model):
    engine = Engine(model, None, Limits(prefill_chunk=8, prefill_share=0.01))
    long = Request(long_prompt(60), max_new_tokens=3)
    queued(engine, long)
    engine.iterate()
    engine.iterate()
    (prefill,) = engine.prefills
    assert prefill.row.head_tokens == 16, "alone, its slices run back to back"
    queued(engine, Request([3, 4, 5], max_new_tokens=50))
    engine.iterate()
    assert prefill.row.head_tokens == 24
    engine.iterate()
    assert prefill.row.head_tokens == 24, "the decoding row gets 99 times the slice's time first"


def test_a_long_prompt_being_prefilled_counts_in_the_budget_rows_and_batches(model):
    limits = Limits(max_rows=3, cache_columns=300, batches=2, prefill_chunk=8)
    engine = Engine(model, None, limits)
    long = Request(long_prompt(150), max_new_tokens=60)  # 210 columns
    queued(engine, long)
    engine.iterate()
    assert engine.prefills and engine.cache_columns() == 210
    assert engine.load() == (1, 0)
    another = queued(engine, Request(long_prompt(20), max_new_tokens=10))  # a batch of its own
    too_wide = queued(engine, Request(long_prompt(80), max_new_tokens=10))  # over the budget
    engine.iterate()
    assert another.admitted and not too_wide.admitted
    peaks = []
    run_out(engine, lambda: peaks.append((engine.cache_columns(), allocated_columns(engine))))
    assert max(counted for counted, _ in peaks) <= limits.cache_columns
    assert all(allocated <= counted for counted, allocated in peaks), "the budget is real memory"
    assert too_wide.future.result().finish_reason == "length"


def test_a_long_prompt_cancelled_while_prefilled_ends_there(model):
    engine = Engine(model, None, Limits(prefill_chunk=8))
    ticket = queued(engine, Request(long_prompt(60), max_new_tokens=3))
    engine.iterate()
    ticket.cancel()
    engine.iterate()
    assert not engine.prefills
    assert ticket.future.result().finish_reason == "cancelled"


def test_prefill_share_is_a_share_of_time():
    with pytest.raises(ValueError, match="share of time"):
        Limits(prefill_share=0)
