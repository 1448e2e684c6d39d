"""The OpenAI-compatible endpoints, driven by the official openai client against a live ASGI
server (uvicorn, as the serving process runs)."""

import openai
import pytest

from registry.models import ApiKey

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def client(asgi_server, alice, fresh_pool):
    _, key = ApiKey.create_for(alice, "openai", [ApiKey.READ])
    return openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=key, max_retries=0)


def test_models_list_base_models_auto_and_listed_experts(client, make_expert, publish, bob):
    publish(make_expert("words"), seed=1)
    publish(make_expert("hidden", visibility="private", owner=bob), seed=2)
    ids = {model.id for model in client.models.list()}
    assert {"tiny-llama", "tiny-llama:auto", "tiny-llama:alice/words"} <= ids
    assert not any("hidden" in model_id for model_id in ids)


def test_completions_and_chat_with_an_expert_streamed_or_not(client, make_expert, publish):
    publish(make_expert("words"), seed=1)
    model = "tiny-llama:alice/words"
    completion = client.completions.create(
        model=model, prompt="w5 w6 w7", max_tokens=5, temperature=0
    )
    # The model that answered: the version the name resolved to.
    assert completion.object == "text_completion" and completion.model == f"{model}@1"
    assert completion.usage.prompt_tokens == 3
    assert completion.choices[0].finish_reason in ("stop", "length")
    streamed = client.completions.create(
        model=model, prompt="w5 w6 w7", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == completion.choices[0].text

    messages = [{"role": "user", "content": "w5 w6"}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=5, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, max_tokens=5, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert {chunk.model for chunk in chunks} == {chat.model} == {f"{model}@1"}
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chat.model_extra["latentry"]["augmented"] is True


def test_errors_come_back_as_openai_errors(client, base_model):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-base", prompt="w5", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-llama", prompt="w5", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-llama", messages=[], max_tokens=2)


def test_a_bad_streamed_request_is_refused_before_the_stream(client, base_model):
    with pytest.raises(openai.BadRequestError, match="does not fit the context"):
        client.completions.create(model="tiny-llama", prompt="w5 " * 260, max_tokens=2, stream=True)


@pytest.mark.parametrize(
    "model, message",
    [
        ("tiny-llama:demo/nope", "expert demo/nope not found for tiny-llama"),
        ("tiny-llama:alice/words@nope", "expert alice/words@nope has no such ready version"),
        ("tiny-llama:alice/words@7", "expert alice/words@7 has no such ready version"),
        ("tiny-llama:bob/hidden", "expert bob/hidden not found for tiny-llama"),
        ("no-such-base", "no base model 'no-such-base' is served here"),
    ],
)
def test_a_model_that_is_not_there_is_404_model_not_found(
    client, make_expert, publish, bob, model, message
):
    publish(make_expert("words"), seed=1)
    publish(make_expert("hidden", visibility="private", owner=bob), seed=2)
    expected = {
        "message": message,
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    messages = [{"role": "user", "content": "w5"}]
    calls = [
        lambda: client.completions.create(model=model, prompt="w5", max_tokens=2),
        lambda: client.chat.completions.create(model=model, messages=messages, max_tokens=2),
        lambda: client.chat.completions.create(
            model=model, messages=messages, max_tokens=2, stream=True
        ),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as refused:
            call()
        assert refused.value.status_code == 404
        assert refused.value.response.json() == {"error": expected}


def test_an_expert_dropped_for_the_plain_model_is_not_named_as_the_answering_model(
    client, make_expert, publish
):
    from pathlib import Path

    from registry import storage

    version = publish(make_expert("broken"), seed=1)
    path = Path(storage.artifacts().path(version.artifact_key))
    path.write_bytes(path.read_bytes()[:-1] + b"?")  # its bytes no longer match its sha256
    model = "tiny-llama:alice/broken"
    chunks = list(client.completions.create(model=model, prompt="w5 w6", max_tokens=3, stream=True))
    assert {chunk.model for chunk in chunks} == {"tiny-llama"}
    assert chunks[-1].model_extra["latentry"]["augmented"] is False


def test_an_expert_that_fails_while_generating_is_answered_by_the_plain_model_so_named(
    client, make_expert, publish, monkeypatch
):
    from coprocessor.generate import RunningBatch

    publish(make_expert("flaky"), seed=1)
    step = RunningBatch.step

    def breaking_step(batch):
        for row in batch.rows:
            if row.expert is not None:
                row.end("error", "the logits are not finite")
        return batch.retire() + step(batch)

    monkeypatch.setattr(RunningBatch, "step", breaking_step)
    completion = client.completions.create(
        model="tiny-llama:alice/flaky", prompt="w5 w6", max_tokens=3, temperature=0
    )
    assert completion.model == "tiny-llama"
    flagged = completion.model_extra["latentry"]
    assert flagged["augmented"] is False and "the expert failed" in flagged["reason"]
