"""The router as a serving engine over HTTP: no room answers 503 with Retry-After (before a
stream starts), fair use answers 429, and a client that leaves frees its row."""

import dataclasses
import subprocess
import sys
import threading

import openai
import pytest
import requests
from django.test import Client

from coprocessor.generate import Request, RunningBatch
from inference import fair_use, pool
from registry.models import ApiKey, BaseModel
from tests.factories import (
    ROOT,
    bearer_client,
    client_for,
    free_port,
    logged_in,
    slow_steps,
    wait_for,
    worker_env,
)

GENERATE = "/api/v1/generate"


pytestmark = pytest.mark.usefixtures("fresh_pool")


@pytest.fixture
def engine(base_model):
    return pool.pool().base(BaseModel.objects.get(slug="tiny-llama")).engine


@pytest.fixture
def occupied(settings, base_model, monkeypatch):
    """An engine of one row, busy (a step every 10 ms) until released, and a queue of one,
    full."""
    settings.LATENTRY_ENGINE_MAX_ROWS = 1
    settings.LATENTRY_ENGINE_MAX_WAITING = 1
    slow_steps(monkeypatch, 0.01)
    engine = pool.pool().base(BaseModel.objects.get(slug="tiny-llama")).engine
    release = threading.Event()
    busy = engine.submit(Request([1, 2], max_new_tokens=200, on_token=lambda _: release.is_set()))
    wait_for(lambda: busy.admitted, what="the engine busy")
    engine.submit(Request([3], max_new_tokens=1))  # waits: the queue is full
    yield engine
    release.set()


def ask(client, **body):
    return client.post(GENERATE, {"base": "tiny-llama", "max_new_tokens": 6, **body}, format="json")


def test_a_full_engine_answers_503_with_retry_after(occupied, alice):
    response = ask(client_for(alice), prompt="w5 w6")
    assert response.status_code == 503
    assert int(response["Retry-After"]) >= 1
    assert "the queue is full" in response.json()["detail"]


def test_a_stream_that_waits_past_its_queue_timeout_is_refused_before_it_starts(
    settings, occupied, asgi_server, alice
):
    occupied.limits.max_waiting, occupied.limits.queue_timeout_s = 5, 0.3
    _, key = ApiKey.create_for(alice, "openai", [ApiKey.READ])
    client = openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.InternalServerError) as refused:
        client.completions.create(model="tiny-llama", prompt="w5 w6", max_tokens=3, stream=True)
    assert refused.value.status_code == 503
    assert refused.value.response.headers["Retry-After"]
    assert refused.value.body["type"] == "server_error"
    assert "not admitted within 0.3 s" in refused.value.body["message"]


def test_a_caller_over_its_concurrent_generations_gets_429(settings, base_model, alice):
    settings.LATENTRY_CALLER_CONCURRENCY = 1
    settings.LATENTRY_ANONYMOUS_GENERATION = True  # the other caller has no account
    fair_use.acquire(f"user:{alice.pk}", 0)  # one generation of alice's already running
    response = ask(client_for(alice), prompt="w5 w6")
    assert response.status_code == 429 and response["Retry-After"]
    assert "1 generations at a time" in response.json()["detail"]
    other = ask(client_for(None), prompt="w5 w6")  # another caller is not held up
    assert other.status_code == 200
    fair_use.release(f"user:{alice.pk}", 0)
    assert ask(client_for(alice), prompt="w5 w6").status_code == 200


def test_a_caller_over_its_token_rate_gets_429_until_the_next_minute(settings, base_model, alice):
    settings.LATENTRY_CALLER_TOKENS_PER_MIN = 8
    assert ask(client_for(alice), prompt="w5 w6 w7", max_new_tokens=6).status_code == 200
    response = ask(client_for(alice), prompt="w5 w6 w7")
    assert response.status_code == 429
    assert 0 < int(response["Retry-After"]) <= 60
    assert "8 tokens (prompt plus generated) a minute" in response.json()["detail"]


def test_two_keys_of_one_user_share_one_token_rate(settings, base_model, alice, bob):
    settings.LATENTRY_CALLER_TOKENS_PER_MIN = 8
    first, second = bearer_client(alice), bearer_client(alice)
    assert ask(first, prompt="w5 w6 w7", max_new_tokens=6).status_code == 200
    refused = ask(second, prompt="w5 w6 w7")
    assert refused.status_code == 429
    assert "8 tokens (prompt plus generated) a minute" in refused.json()["detail"]
    assert ask(bearer_client(bob), prompt="w5 w6 w7").status_code == 200


def test_two_keys_of_one_user_share_one_count_of_generations_at_a_time(
    monkeypatch, settings, engine, asgi_server, alice
):
    settings.LATENTRY_CALLER_CONCURRENCY = 1
    engine.limits.max_rows = 1
    slow_steps(monkeypatch, 0.01)
    release = threading.Event()
    busy = engine.submit(Request([1, 2], max_new_tokens=200, on_token=lambda _: release.is_set()))
    wait_for(lambda: busy.admitted, what="the engine busy")
    (_, first), (_, second) = (ApiKey.create_for(alice, name, [ApiKey.READ]) for name in "ab")

    def complete(key):
        body = {"model": "tiny-llama", "prompt": "w5 w6", "max_tokens": 2}
        headers = {"Authorization": f"Bearer {key}"}
        return requests.post(f"{asgi_server}/v1/completions", json=body, headers=headers)

    answers = []
    waiting = threading.Thread(target=lambda: answers.append(complete(first)))
    waiting.start()
    wait_for(lambda: engine.load()[1] == 1, what="the first key's generation waiting")
    refused = complete(second)
    release.set()
    waiting.join(30)
    assert refused.status_code == 429
    assert "1 generations at a time" in refused.json()["error"]["message"]
    assert [answer.status_code for answer in answers] == [200]


def test_a_streaming_client_that_leaves_frees_its_row(
    monkeypatch, engine, asgi_server, alice, settings
):
    settings.LATENTRY_MAX_NEW_TOKENS = 200
    slow_steps(monkeypatch, 0.02)  # 200 tokens take 4 s: long enough to leave in the middle
    monkeypatch.setattr(engine, "eos_token_id", None)  # no row ends by drawing its eos
    tickets = []
    submit_together = engine.submit_together

    def submit_and_keep(*args, **kwargs):
        tickets.extend(submit_together(*args, **kwargs))
        return tickets

    monkeypatch.setattr(engine, "submit_together", submit_and_keep)
    _, key = ApiKey.create_for(alice, "openai", [ApiKey.READ])
    body = {"model": "tiny-llama", "prompt": "w5 w6", "max_tokens": 200, "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    with requests.post(
        f"{asgi_server}/v1/completions", json=body, headers=headers, stream=True, timeout=10
    ) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    (ticket,) = tickets
    generation = ticket.future.result(timeout=5)
    # The row ended because its client left, well before its 200 tokens, and nothing holds it.
    assert generation.finish_reason == "cancelled", (generation.finish_reason, generation.error)
    assert len(generation.token_ids) < 100
    wait_for(lambda: engine.load() == (0, 0), timeout=3, what="the row freed")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_try_it_in_a_web_process_asks_the_serving_process(
    make_expert, publish, settings, tmp_path, alice
):
    publish(make_expert("pydoc", visibility="private"))  # only alice may use it
    port = free_port()
    env = worker_env("unused", tmp_path / "artifacts", LATENTRY_SERVING_URL="")
    command = [sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(port)]
    serving = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(f"{url}/v1/models"), timeout=60, what="the serving process")
        settings.LATENTRY_SERVING_URL = url
        browser = Client()
        browser.force_login(alice)
        response = browser.post(
            "/experts/alice/pydoc/try/", {"prompt": "w5 w6 w7", "max_new_tokens": 4}
        )
        assert response.status_code == 200, response.text
        assert "Plain base model" in response.text and "With alice/pydoc@1" in response.text
        assert 'data-augmented="true"' in response.text
        assert not pool.pool().bases, "the web process loaded no model"
        direct = client_for(alice).post(GENERATE, {"base": "tiny-llama", "prompt": "w5"})
        assert direct.status_code == 404 and url in direct.json()["detail"]
    finally:
        serving.terminate()
        serving.wait(timeout=30)


def _answers(url):
    try:
        return requests.get(url, timeout=2).ok
    except requests.ConnectionError:
        return False


def test_an_expert_that_breaks_a_row_after_its_prefill_is_served_plain_or_ends_the_stream(
    monkeypatch, engine, make_expert, publish, alice
):
    from inference import service

    publish(make_expert("flaky"))
    sent = []
    # The first run sends nothing; the second breaks only once its text went out (the text
    # is made by whoever waits, so without this the break could come first under load).
    breaking_expert_rows(monkeypatch, when=lambda: not sent or sent[0])
    ask = service.Ask(base="tiny-llama", expert="alice/flaky", prompt="w5 w6", max_new_tokens=6)
    answer = service.run(ask, alice)  # nothing was sent yet: served again, plain
    assert not answer.augmented and "the expert failed" in answer.reason
    plain = service.run(service.Ask(base="tiny-llama", prompt="w5 w6", max_new_tokens=6), alice)
    assert answer.token_ids == plain.token_ids
    monkeypatch.setattr(engine, "eos_token_id", None)  # no row ends before it breaks
    long_ask = dataclasses.replace(ask, max_new_tokens=200)
    with pytest.raises(service.GenerationFailed, match="not finite"):
        service.run(long_ask, alice, on_text=sent.append)  # text went out: the stream ends
    assert sent


def breaking_expert_rows(monkeypatch, after_tokens=2, when=lambda: True):
    """Rows with an expert fail once they have ``after_tokens`` tokens and ``when()`` holds,
    as a row whose numbers broke after its prefill does."""
    step = RunningBatch.step

    def breaking_step(batch):
        for row in batch.rows:
            if row.expert is not None and len(row.tokens) >= after_tokens and when():
                row.end("error", "the logits are not finite")
        return batch.retire() + step(batch)

    monkeypatch.setattr(RunningBatch, "step", breaking_step)


def test_a_plain_retry_streams_its_text_as_it_is_generated(
    monkeypatch, engine, make_expert, publish, alice
):
    import asyncio

    from inference import service

    publish(make_expert("flaky"))
    breaking_expert_rows(monkeypatch)
    monkeypatch.setattr(engine, "eos_token_id", None)  # no row ends before it breaks
    # A stop string holds 15 characters back, so the break comes before any text went out.
    ask = service.Ask(
        base="tiny-llama", expert="alice/flaky", prompt="w5 w6", max_new_tokens=20, stop=["§" * 16]
    )
    pending = service.plan(ask, alice)
    calls, go_on = [], threading.Event()

    def held_at_the_retrys_twelfth_token(token):  # on the engine's thread
        calls.append(token)
        stopped = pending.stream.push(token)
        if len(calls) == 2 + 12:  # the expert's 2 tokens, then the plain model's
            go_on.wait(10)
        return stopped

    pending.request.on_token = held_at_the_retrys_twelfth_token
    pending.submit()

    async def consume():
        events = pending.events()
        seen = []
        while not isinstance(event := await anext(events), service.Retry):
            seen.append(event)
        # The retry's text comes while it is still generating, not in a burst after it.
        first = await asyncio.wait_for(anext(events), timeout=5)
        go_on.set()
        rest = [event async for event in events]
        return seen, first, rest

    try:
        seen, first, rest = asyncio.run(consume())
    finally:
        go_on.set()
    answer = rest[-1]
    assert seen == [] and isinstance(first, str)
    assert not answer.augmented and "the expert failed" in answer.reason
    assert first + "".join(rest[:-1]) == answer.text


@pytest.mark.django_db(transaction=True)
def test_an_overload_on_the_plain_retry_ends_the_stream_with_an_error_event(
    monkeypatch, settings, engine, asgi_server, make_expert, publish, alice
):
    from coprocessor.engine import Overloaded

    publish(make_expert("flaky"))
    breaking_expert_rows(monkeypatch)
    monkeypatch.setattr(engine, "eos_token_id", None)  # no row ends before it breaks
    submit_together = engine.submit_together

    def full_for_the_retry(requests, **kwargs):
        if requests[0].expert is None:
            raise Overloaded("the queue is full (1 requests waiting)", 1)
        return submit_together(requests, **kwargs)

    monkeypatch.setattr(engine, "submit_together", full_for_the_retry)
    _, key = ApiKey.create_for(alice, "openai", [ApiKey.READ])
    body = {"model": "tiny-llama:alice/flaky", "prompt": "w5 w6", "max_tokens": 8,
            "stream": True, "stop": ["§" * 16]}  # fmt: skip
    with requests.post(
        f"{asgi_server}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        stream=True,
        timeout=10,
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert "queue is full" in lines[-2] and '"error"' in lines[-2]
    assert lines[-1] == "data: [DONE]"
    wait_for(lambda: engine.load() == (0, 0), timeout=3, what="the rows freed")
    settings.LATENTRY_CALLER_CONCURRENCY = 1

    def place_given_back():  # the stream's end gives it back just after [DONE] went out
        try:
            fair_use.acquire(f"user:{alice.pk}", 0)
        except fair_use.Refused:
            return False
        fair_use.release(f"user:{alice.pk}", 0)
        return True

    wait_for(place_given_back, timeout=3, what="the stream's fair use place given back")


def test_many_open_streams_are_served_together_by_one_process(
    monkeypatch, settings, engine, asgi_server
):
    import asyncio
    import json

    settings.LATENTRY_CALLER_CONCURRENCY = settings.LATENTRY_CALLER_TOKENS_PER_MIN = 0
    settings.LATENTRY_ANONYMOUS_GENERATION = True  # 200 sockets, no keys
    unlimited = {"generate": None, "generate_anonymous": None}
    settings.LATENTRY_THROTTLE_RATES = {**settings.LATENTRY_THROTTLE_RATES, **unlimited}
    slow_steps(monkeypatch, 0.005)  # the streams stay open together for a while
    streams = 200  # twice the connections PostgreSQL allows by default
    host, port = asgi_server.removeprefix("http://").split(":")
    body = json.dumps({"model": "tiny-llama", "prompt": "w5 w6", "max_tokens": 16, "stream": True})
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
    ).encode()

    async def one():  # a plain socket per stream: every one of them open at the same time
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        answer = (await reader.read()).decode()
        writer.close()
        return answer.split("\r\n", 1)[0], "data: [DONE]" in answer

    async def all_of_them():
        threads = []

        async def count_threads():
            while True:
                threads.append(threading.active_count())
                await asyncio.sleep(0.05)

        counting = asyncio.create_task(count_threads())
        answers = await asyncio.gather(*(one() for _ in range(streams)))
        counting.cancel()
        return answers, max(threads)

    answers, most_threads = asyncio.run(all_of_them())
    assert answers == [("HTTP/1.1 200 OK", True)] * streams
    # no thread (nor its database connection) per open stream: a few shared ones
    assert most_threads < 20 + settings.LATENTRY_ROUTER_SYNC_THREADS
    assert max(engine.admitted_sizes) > 1  # they were batched together


def test_router_bodies_over_the_bound_are_413_before_they_are_read(asgi_server, settings):
    limit = settings.LATENTRY_ROUTER_MAX_BODY_BYTES
    big = b'{"model": "tiny-llama", "prompt": "' + b"w5 " * limit + b'"}'
    declared = requests.post(f"{asgi_server}/v1/completions", data=big, timeout=30)
    assert declared.status_code == 413
    assert "over the limit" in declared.json()["error"]["message"]  # OpenAI's shape

    def chunks():  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    chunked = requests.post(f"{asgi_server}/api/v1/generate", data=chunks(), timeout=30)
    assert chunked.status_code == 413 and "over the limit" in chunked.json()["detail"]


def test_the_engine_knows_who_asks_through_the_api_and_try_it(
    monkeypatch, settings, make_expert, publish, alice
):
    """So that it bounds one caller's columns in flight (engine.Limits.caller_columns)."""
    settings.LATENTRY_ANONYMOUS_GENERATION = True  # one caller by address
    from coprocessor.engine import Engine

    publish(make_expert("pydoc"))
    callers = []
    submit = Engine.submit_together

    def recording(engine, requests, **kwargs):
        callers.extend(request.caller for request in requests)
        return submit(engine, requests, **kwargs)

    monkeypatch.setattr(Engine, "submit_together", recording)
    assert ask(client_for(alice), prompt="w5 w6").status_code == 200
    assert ask(client_for(), prompt="w5 w6").status_code == 200
    page = logged_in(alice).post("/experts/alice/pydoc/try/", {"prompt": "w5", "max_new_tokens": 2})
    assert page.status_code == 200, page.content
    assert callers == [f"user:{alice.pk}", "addr:127.0.0.1", f"user:{alice.pk}", f"user:{alice.pk}"]


def test_a_stop_string_ends_the_answer_and_its_tokens_before_it(monkeypatch, engine, alice):
    from inference import service

    monkeypatch.setattr(engine, "eos_token_id", None)  # twelve words, whatever they are
    ask = service.Ask(base="tiny-llama", prompt="w5 w6", max_new_tokens=12)
    whole = service.run(ask, alice)
    words = whole.text.split()
    assert len(words) >= 6, whole.text
    stop = " " + words[4]
    at = whole.text.find(stop)
    stopped = service.run(dataclasses.replace(ask, stop=[stop]), alice)
    assert stopped.text == whole.text[:at] and stopped.finish_reason == "stop"
    assert stopped.completion_tokens < whole.completion_tokens
    assert stopped.token_ids == whole.token_ids[: stopped.completion_tokens]


def test_static_files_are_served_in_both_modes(settings, rf):
    """The serving process (``make run`` serves everything from it) runs the middleware in
    async mode, the web process in sync mode: a static file is served in both, and anything
    else goes on to the view."""
    from asgiref.sync import async_to_sync, iscoroutinefunction
    from django.http import HttpResponse

    from registry.middleware import StaticFilesMiddleware

    settings.WHITENOISE_USE_FINDERS = settings.WHITENOISE_AUTOREFRESH = True

    async def async_view(request):
        return HttpResponse("page")

    in_async = StaticFilesMiddleware(async_view)
    in_sync = StaticFilesMiddleware(lambda request: HttpResponse("page"))
    assert iscoroutinefunction(in_async) and not iscoroutinefunction(in_sync)
    for serve in (async_to_sync(in_async), in_sync):
        static = serve(rf.get("/static/latentry.css"))
        assert static.status_code == 200
        assert static["Content-Type"].startswith("text/css")
        assert serve(rf.get("/experts/")).content == b"page"


def test_every_middleware_runs_in_the_serving_process_s_event_loop(settings):
    """No middleware that runs only synchronously: one would put every router request's
    chain, and its wait for the async view, in a thread of the serving process's few."""
    from django.utils.module_loading import import_string

    sync_only = [
        m for m in settings.MIDDLEWARE if not getattr(import_string(m), "async_capable", 0)
    ]
    assert sync_only == []
