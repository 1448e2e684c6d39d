"""The router: named, pinned and automatic experts, degrading, batching, attach, usage."""

import base64
import threading
from pathlib import Path

import pytest
import torch
from django.db import connection
from safetensors.torch import load

from coprocessor.decoder import prefill
from coprocessor.expert import Coprocessor
from coprocessor.generate import Request, generate
from inference import choose, pool
from inference.models import Usage
from registry.models import ApiKey
from tests.factories import bearer_client, client_for, phrase_text

GENERATE = "/api/v1/generate"


pytestmark = pytest.mark.usefixtures("fresh_pool")


def ask(client, **body):
    return client.post(GENERATE, {"base": "tiny-llama", "max_new_tokens": 6, **body}, format="json")


def loaded_expert(model, version, tmp_path):
    path = tmp_path / "expert.safetensors"
    with version.open_artifact() as f:
        path.write_bytes(f.read())
    return Coprocessor.load(model, path).eval()


def direct(decoder, version, prompt, tmp_path, max_new_tokens=6):
    """The same generation without the router: what the answer must equal."""
    model, tokenizer = decoder
    expert = loaded_expert(model, version, tmp_path) if version is not None else None
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    (out,) = generate(model, [Request(ids, expert, max_new_tokens)], tokenizer.eos_token_id)
    return out.token_ids


def test_plain_generation_names_no_expert_and_times_its_parts(alice_client, base_model, decoder):
    response = ask(alice_client, prompt="w5 w6 w7")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["augmented"] is False and body["expert"] is None
    assert body["reason"] == "no expert requested"
    assert body["prompt_tokens"] == 3 and 1 <= body["completion_tokens"] <= 6
    assert set(body["timings_ms"]) == {"routing_ms", "queue_ms", "prefill_ms", "decode_ms"}


def test_a_named_expert_is_attached_and_equals_the_library_s_output(
    alice_client, make_expert, publish, decoder, tmp_path
):
    expert = make_expert("words")
    version = publish(expert, seed=1)
    body = ask(alice_client, prompt="w5 w6 w7", expert="alice/words").json()
    assert body["augmented"] is True and body["expert"] == "alice/words@1"
    tokenizer = decoder[1]
    assert body["text"] == tokenizer.decode(direct(decoder, version, "w5 w6 w7", tmp_path))
    assert body["text"] != ask(alice_client, prompt="w5 w6 w7").json()["text"]
    pinned = ask(alice_client, prompt="w5 w6 w7", expert="alice/words@1").json()
    assert pinned["expert"] == "alice/words@1"


def test_naming_an_expert_costs_one_query_without_large_columns(
    alice, make_expert, publish, django_assert_num_queries
):
    expert = make_expert("words")
    publish(expert)
    with django_assert_num_queries(1) as captured:
        choice = choose.named("alice/words", expert.base_model, alice)
    assert choice.name == "alice/words@1"
    (query,) = captured.captured_queries
    assert '"config"' not in query["sql"] and '"routing_profile"' not in query["sql"]


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("alice/words@9", "alice/words@9 has no such ready version"),
        ("alice/words@nope", "alice/words@nope has no such ready version"),  # no such alias
        ("alice/nothing", "alice/nothing not found for tiny-llama"),
        ("alice/secret", "alice/secret not found for tiny-llama"),  # private: as if missing
        ("alice/empty", "alice/empty has no such ready version"),  # no version yet
    ],
)
@pytest.mark.parametrize("path", [GENERATE, "/api/v1/attach"])
def test_a_named_expert_that_is_not_there_is_404_and_says_why(
    bob_client, make_expert, publish, spec, reason, path
):
    publish(make_expert("words"))
    publish(make_expert("secret", visibility="private"), seed=2)
    make_expert("empty")
    body = {"base": "tiny-llama", "prompt": "w5 w6", "expert": spec}
    response = bob_client.post(path, body, format="json")
    assert response.status_code == 404
    assert response.json() == {"detail": f"expert {reason}"}


@pytest.mark.parametrize("spec", ["not-a-name", "alice/words@²", "alice/words@٣", "alice/words@"])
def test_a_malformed_expert_name_is_400(alice_client, make_expert, publish, spec):
    publish(make_expert("words"))
    response = ask(alice_client, prompt="w5 w6", expert=spec)
    assert response.status_code == 400
    assert "is not owner/name, owner/name@version or @alias" in str(response.json())


def test_a_corrupted_stored_file_degrades_then_its_rejected_version_is_404(
    alice_client, make_expert, publish
):
    version = publish(make_expert("broken"))
    from registry import storage

    path = Path(storage.artifacts().path(version.artifact_key))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    body = ask(alice_client, prompt="w5 w6", expert="alice/broken").json()
    assert body["augmented"] is False and "sha256" in body["reason"]
    version.refresh_from_db()
    assert version.status == version.REJECTED and "sha256" in version.status_reason
    again = ask(alice_client, prompt="w5 w6", expert="alice/broken")  # no ready version now
    assert again.status_code == 404
    assert again.json()["detail"] == (
        f"expert alice/broken@1 was rejected: {version.status_reason}"
    )
    listed = alice_client.get("/api/v1/experts/alice/broken/versions/").json()["results"]
    assert [(v["status"], v["status_reason"]) for v in listed] == [
        ("rejected", version.status_reason)
    ]


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"base": "no-such-model"}, 404, "no base model"),
        ({"prompt": "w5 " * 260}, 400, "does not fit the context"),
        ({"max_new_tokens": 100_000}, 400, "over the limit"),
        ({"messages": [{"role": "user", "content": "w5"}]}, 400, "exactly one of"),
        ({"prompt": "   "}, 400, "empty"),
        ({"temperature": -1}, 400, "temperature"),
    ],
)
def test_bad_requests_get_clear_errors(alice_client, base_model, body, status, message):
    response = ask(alice_client, **{"prompt": "w5 w6", **body})
    assert response.status_code == status
    assert message in str(response.json())


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_share_batches_and_equal_one_at_a_time(
    alice, make_expert, publish, settings
):
    settings.LATENTRY_CALLER_CONCURRENCY = 6  # all of alice's at once (fair use allows 4)
    for i in range(3):
        publish(make_expert(f"e{i}"), seed=10 + i)
    specs = ["", "alice/e0", "alice/e1", "", "alice/e2", "alice/e0"]
    prompts = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13", "w3", "w20 w21", "w30 w31 w32"]
    alone = [
        ask(client_for(alice), prompt=p, expert=s).json()["text"]
        for p, s in zip(prompts, specs, strict=True)
    ]
    results = [None] * len(specs)

    def one(i):
        try:
            results[i] = ask(client_for(alice), prompt=prompts[i], expert=specs[i]).json()["text"]
        finally:
            connection.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(specs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == alone
    assert len(pool.pool().bases["tiny-llama"].engine.admitted_sizes) < 2 * len(specs)


def test_auto_routes_by_the_prompt_and_never_to_others_private_experts(
    alice, bob, alice_client, bob_client, make_expert, publish
):
    text_a = phrase_text(length=1500, seed=1)
    text_b = phrase_text(length=1500, seed=2)
    publish(make_expert("topic-a"), seed=1, profile_text=text_a)
    publish(make_expert("topic-b"), seed=2, profile_text=text_b)
    prompt_a = " ".join(text_a.split()[-40:])
    prompt_b = " ".join(text_b.split()[-40:])
    routed_a = ask(alice_client, prompt=prompt_a, expert="auto").json()
    routed_b = ask(alice_client, prompt=prompt_b, expert="auto").json()
    assert routed_a["expert"] == "alice/topic-a@1" and routed_a["score"] > 0
    assert routed_b["expert"] == "alice/topic-b@1"
    choose.profiles.clear()
    publish(make_expert("topic-c", owner=alice, visibility="private"), 3, profile_text=text_b)
    publish(make_expert("other", owner=bob), seed=4, profile_text=text_a)
    for client in (bob_client,):
        seen = ask(client, prompt=prompt_b, expert="auto").json()
        assert seen["expert"] != "alice/topic-c@1"


def test_auto_never_routes_to_a_rejected_version(alice_client, make_expert, publish):
    text_a = phrase_text(length=1500, seed=1)
    text_b = phrase_text(length=1500, seed=2)
    publish(make_expert("topic-a"), seed=1, profile_text=text_a)
    rejected = publish(make_expert("topic-b"), seed=2, profile_text=text_b)
    prompt_b = " ".join(text_b.split()[-40:])
    assert ask(alice_client, prompt=prompt_b, expert="auto").json()["expert"] == "alice/topic-b@1"
    rejected.reject("stored bytes of version 1 do not match its sha256")
    # The cached profiles still hold it: the check at routing time keeps it out.
    assert ask(alice_client, prompt=prompt_b, expert="auto").json()["expert"] != "alice/topic-b@1"


def test_auto_below_the_threshold_uses_no_expert(alice_client, make_expert, publish, settings):
    settings.LATENTRY_AUTO_THRESHOLD = 1.01
    publish(make_expert("topic-a"), seed=1, profile_text=phrase_text(length=600, seed=1))
    publish(make_expert("topic-b"), seed=2, profile_text=phrase_text(length=600, seed=2))
    body = ask(alice_client, prompt="w5 w6 w7", expert="auto").json()
    assert body["augmented"] is False and "under the threshold" in body["reason"]


def test_attach_returns_the_expert_s_latents(alice_client, make_expert, publish, decoder, tmp_path):
    version = publish(make_expert("words"), seed=5)
    response = alice_client.post(
        "/api/v1/attach",
        {"base": "tiny-llama", "expert": "alice/words", "prompt": "w5 w6 w7"},
        format="json",
    )
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["shape"] == [2, 32] and body["insert_before"] == 2
    tensors = load(base64.b64decode(body["safetensors_base64"]))
    model = decoder[0]
    expert = loaded_expert(model, version, tmp_path)
    with torch.no_grad():
        prefix = torch.tensor([[5, 6]])
        past, bias, positions, _ = prefill(model, prefix, torch.ones_like(prefix, dtype=torch.bool))
        expected = expert.latents(past, bias, positions)[0]
    torch.testing.assert_close(tensors["latents"], expected)
    assert tensors["gate_bias"].shape == (2,)


def test_usage_is_recorded_per_api_key_and_shown_to_its_owner(alice, bob, base_model):
    client = bearer_client(alice, scopes=[ApiKey.READ])  # generating is not a write
    for _ in range(2):
        assert ask(client, prompt="w5 w6").status_code == 200
    usage = Usage.objects.get()
    assert usage.requests == 2 and usage.prompt_tokens == 4 and usage.completion_tokens > 0
    rows = client.get("/api/v1/usage/").json()["results"]
    assert rows[0]["requests"] == 2 and rows[0]["api_key"] == "test"
    assert client_for(bob).get("/api/v1/usage/").json()["count"] == 0


def test_the_expert_cache_is_lru_by_bytes_and_loads_each_key_once():
    cache = pool.ExpertCache(capacity_bytes=100)
    loads = []

    def loader(key, size):
        def load():
            loads.append(key)
            return f"expert-{key}", size

        return load

    assert cache.get("a", loader("a", 40)) == "expert-a"
    cache.get("b", loader("b", 40))
    cache.get("a", loader("a", 40))  # a is now the most recent
    cache.get("c", loader("c", 40))  # over 100 bytes: b goes
    assert list(cache.items) == ["a", "c"] and cache.size == 80
    assert loads == ["a", "b", "c"]

    gate = threading.Event()

    def slow():
        gate.wait(5)
        loads.append("d")
        return "expert-d", 10

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("d", slow))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join()
    assert results == ["expert-d"] * 4 and loads.count("d") == 1


def test_a_slow_expert_load_degrades_instead_of_waiting(
    alice_client, make_expert, publish, settings
):
    publish(make_expert("slow"))
    settings.LATENTRY_EXPERT_LOAD_TIMEOUT_S = 0.0
    body = ask(alice_client, prompt="w5 w6", expert="alice/slow").json()
    assert body["augmented"] is False and "took too long" in body["reason"]


def test_warm_up_loads_every_served_base_model_before_requests(base_model):
    assert "tiny-llama" not in pool.pool().bases
    pool.warm_up()
    loaded = pool.pool().bases["tiny-llama"]
    assert list(loaded.engine.admitted_sizes) == [1]
    assert loaded.decoder._latentry_hooked  # hooks in before any expert or request


def test_a_re_imported_base_model_row_keeps_serving_its_experts(
    alice_client, base_model, make_expert, publish, tiny_spec, tiny_base_dir
):
    """The pool loads weights once per slug, but lookups use the current row: a row deleted
    and imported again (a new id) still finds the experts made for it."""
    from registry.models import BaseModel, Expert
    from tests.factories import register_tiny_llama

    assert ask(alice_client, prompt="w5 w6", max_new_tokens=1).status_code == 200
    Expert.objects.all().delete()
    BaseModel.objects.all().delete()
    again = register_tiny_llama(tiny_spec, tiny_base_dir)
    assert again.pk != base_model.pk
    publish(make_expert("words", base_model=again))
    answer = ask(alice_client, expert="alice/words", prompt="w5", max_new_tokens=1).json()
    assert answer["augmented"], answer["reason"]


@pytest.mark.parametrize("n_latents", [0, 2])
def test_an_expert_with_a_static_prefix_is_served_and_attached(
    alice_client, make_expert, publish, decoder, tmp_path, n_latents
):
    version = publish(make_expert("cached"), seed=3, prefix_positions=4, n_latents=n_latents)
    assert version.prefix_positions == 4 and version.kind == ("prefix" if not n_latents else "lora")
    body = ask(alice_client, prompt="w5 w6 w7", expert="alice/cached").json()
    assert body["augmented"] is True
    assert body["text"] == decoder[1].decode(direct(decoder, version, "w5 w6 w7", tmp_path))
    response = alice_client.post(
        "/api/v1/attach",
        {"base": "tiny-llama", "expert": "alice/cached", "prompt": "w5 w6 w7"},
        format="json",
    )
    body = response.json()
    assert body["prefix_positions"] == 4 and body["position"] == 4 + 2
    tensors = load(base64.b64decode(body["safetensors_base64"]))
    expert = loaded_expert(decoder[0], version, tmp_path)
    torch.testing.assert_close(tensors["prefix.keys"], expert.prefix.keys)
    assert tensors["prefix.gate_bias"].shape == (4,)
    assert ("latents" in tensors) == bool(n_latents)


def test_an_expert_whose_positions_do_not_fit_is_left_out(alice_client, make_expert, publish):
    publish(make_expert("long"), seed=3, prefix_positions=200, n_latents=0)
    body = ask(alice_client, prompt="w5 w6 w7", expert="alice/long", max_new_tokens=60).json()
    assert body["augmented"] is False
    assert "200 prefix and latent positions do not fit the context of 256" in body["reason"]


def test_the_routing_centre_is_measured_once_at_the_first_auto_request(base_model, alice):
    from inference import service

    loaded = pool.pool().base(base_model)
    assert loaded.centre_held == [], "loading a base model measures nothing for auto"
    ask = service.Ask(base="tiny-llama", expert="auto", prompt="w5 w6", max_new_tokens=1)
    service.run(ask, alice)
    (centre,) = loaded.centre_held
    service.run(ask, alice)
    assert pool.pool().base(base_model).centre_held == [centre]
