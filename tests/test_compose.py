"""Several experts on one request: the composed prefix, serving it, training beside others,
and asking for it through every way in (native list, "a+b" in OpenAI's model, attach, auto)."""

import base64

import pytest
import torch
from safetensors.torch import load

from coprocessor.compose import CannotCompose, ComposedPrefix, Composition
from coprocessor.expert import Coprocessor, CoprocessorConfig
from coprocessor.generate import Request, generate
from coprocessor.train import TrainConfig, neighbour_prefixes, train
from inference import pool
from registry.models import BaseModel
from tests.factories import SMALL_JOB, bearer_client, prefix_expert
from tests.tiny import phrase_corpus

pytestmark = pytest.mark.usefixtures("fresh_pool")
GENERATE = "/api/v1/generate"


def one_prefix_expert(model, composition):
    """A single expert whose prefix is the composition's, joined: what serving it must equal."""
    config = CoprocessorConfig(n_latents=0, prefix_positions=composition.prefix.n_positions)
    single = Coprocessor(model, config)
    with torch.no_grad():
        single.prefix.keys.copy_(composition.prefix.keys)
        single.prefix.values.copy_(composition.prefix.values)
        single.prefix.gate.copy_(composition.prefix.gate)
    return single.eval()


def test_a_composed_prefix_keeps_the_first_sink_and_every_part_s_own_positions(decoder):
    model, _ = decoder
    a, b = prefix_expert(model, positions=4, seed=1), prefix_expert(model, positions=6, seed=2)
    shared = ComposedPrefix([a.prefix, b.prefix])
    assert shared.n_positions == 4 + 6 - 1  # b's sink is dropped: one sink, a's
    torch.testing.assert_close(shared.keys[:, :, :4], a.prefix.keys)
    torch.testing.assert_close(shared.keys[:, :, 4:], b.prefix.keys[:, :, 1:])
    torch.testing.assert_close(shared.gate, torch.cat([a.prefix.gate, b.prefix.gate[1:]]))
    naive = ComposedPrefix([a.prefix, b.prefix], shared_sink=False)
    assert naive.n_positions == 10
    torch.testing.assert_close(naive.values[:, :, 4:], b.prefix.values)


def test_only_static_prefixes_compose_and_the_refusal_names_the_part(decoder):
    model, _ = decoder
    prefix, latents = prefix_expert(model, seed=1), prefix_expert(model, n_latents=2, seed=2)
    with pytest.raises(CannotCompose, match="bob/latent has a coprocessor"):
        Composition([prefix, latents], names=["alice/prefix", "bob/latent"])
    with pytest.raises(CannotCompose, match="at least two"):
        Composition([prefix])


def test_serving_a_composition_is_serving_its_joined_prefix_beside_other_rows(decoder):
    model, tokenizer = decoder
    a, b = prefix_expert(model, positions=4, seed=1), prefix_expert(model, positions=5, seed=2)
    composed = Composition([a, b])
    assert composed.config.prefix_positions == 8
    prompt = tokenizer("w5 w6 w7", add_special_tokens=False)["input_ids"]
    alone = generate(model, [Request(prompt, one_prefix_expert(model, composed), 6)])
    mixed = generate(
        model,
        [Request(prompt, composed, 6), Request(prompt, a, 6), Request(prompt, None, 6)],
    )
    assert mixed[0].token_ids == alone[0].token_ids
    assert mixed[1].token_ids == generate(model, [Request(prompt, a, 6)])[0].token_ids
    assert mixed[2].token_ids == generate(model, [Request(prompt, None, 6)])[0].token_ids
    request = Request(prompt, composed, 6)
    assert request.cache_columns() == 3 + 6 + 8  # the KV budget counts the composed prefix


def test_coexistence_training_puts_neighbours_beside_the_prefix_and_still_learns(decoder):
    model, tokenizer = decoder
    ids = phrase_corpus(length=3000, seed=1, vocab=12)
    settings = {**SMALL_JOB, "n_latents": 0, "steps": 8, "lr": 1e-2, "coexist": 1.0}
    config = TrainConfig.from_settings({**settings, "coexist_pool": 2})
    neighbours = neighbour_prefixes(model, config, ids)
    assert len(neighbours) == 2 and all(n.n_positions == 4 for n in neighbours)
    assert not any(p.requires_grad for n in neighbours for p in n.parameters())
    assert neighbours[0].gate[1:].unique().numel() == 1  # one gate value per neighbour
    result = train(model, ids, config)
    losses = [loss for _, _, loss in result.history]
    assert losses[-1] < losses[0]  # it learns with a neighbour in every step
    again = train(model, ids, config)
    torch.testing.assert_close(again.expert.prefix.keys, result.expert.prefix.keys)
    alone = train(model, ids, TrainConfig.from_settings({**settings, "coexist": 0.0}))
    assert not torch.equal(alone.expert.prefix.keys, result.expert.prefix.keys)
    with pytest.raises(ValueError, match="share of the steps"):
        TrainConfig(coexist=1.5)


# --- asking for it -----------------------------------------------------------------------------


@pytest.fixture
def pair(make_expert, publish):
    """Two of alice's static prefixes, alice/python (version 1) and alice/unix (versions 1, 2)."""
    python = publish(make_expert("python"), seed=1, n_latents=0, prefix_positions=4)
    unix = make_expert("unix")
    publish(unix, seed=2, n_latents=0, prefix_positions=4)
    publish(unix, seed=3, n_latents=0, prefix_positions=5)
    return python, unix


def test_a_list_in_generate_composes_and_the_answer_names_each_version(alice_client, pair, decoder):
    body = {"base": "tiny-llama", "prompt": "w5 w6 w7", "max_new_tokens": 6}
    response = alice_client.post(
        GENERATE, {**body, "expert": ["alice/python", "alice/unix@1"]}, format="json"
    )
    assert response.status_code == 200, response.json()
    answer = response.json()
    assert answer["augmented"] and answer["expert"] == "alice/python@1+alice/unix@1"
    joined = alice_client.post(
        GENERATE, {**body, "expert": "alice/python+alice/unix@1"}, format="json"
    ).json()
    assert joined["text"] == answer["text"] and joined["expert"] == answer["expert"]
    parts = list(pool.pool().experts.items)  # each part cached once, no composition
    assert len(parts) == 2


def test_openai_model_names_a_composition_with_versions_and_aliases(alice, pair):
    client = bearer_client(alice)
    response = client.post(
        "/v1/completions",
        {"model": "tiny-llama:alice/python+alice/unix@latest", "prompt": "w5 w6", "max_tokens": 3},
        format="json",
    )
    assert response.status_code == 200, response.json()
    assert response.json()["model"] == "tiny-llama:alice/python@1+alice/unix@2"


@pytest.mark.parametrize(
    ("expert", "status", "says"),
    [
        ("alice/python+auto", 400, "auto chooses the experts itself"),
        ("alice/python+alice/python@1", 400, "each expert once: alice/python twice"),
        ("alice/python+alice/unix+alice/a+alice/b+alice/c", 400, "at most 4 experts, not 5"),
        ("alice/python+alice/nothing", 404, "alice/nothing not found"),
        ("alice/python+alice/unix@9", 404, "alice/unix@9 has no such ready version"),
        ("alice/python+al ice", 400, "not owner/name"),
        (["alice/python", 3], 400, "list of expert names"),
        ([], 400, "list of expert names"),
    ],
)
def test_a_composition_that_cannot_be_served_is_refused_and_says_why(
    alice_client, pair, expert, status, says
):
    response = alice_client.post(
        GENERATE, {"base": "tiny-llama", "prompt": "w5", "expert": expert}, format="json"
    )
    assert response.status_code == status, response.json()
    assert says in str(response.json())


def test_a_part_with_a_coprocessor_or_hidden_from_the_caller_is_refused(
    alice_client, bob_client, pair, make_expert, publish
):
    publish(make_expert("latent"), seed=4)  # latents: composing is not defined
    body = {"base": "tiny-llama", "prompt": "w5", "expert": "alice/python+alice/latent"}
    response = alice_client.post(GENERATE, body, format="json")
    assert response.status_code == 400
    assert "alice/latent@1 has a coprocessor" in response.json()["detail"]
    publish(make_expert("secret", visibility="private"), seed=5, n_latents=0, prefix_positions=4)
    hidden = {**body, "expert": "alice/python+alice/secret"}
    assert bob_client.post(GENERATE, hidden, format="json").status_code == 404


def test_a_part_on_another_base_model_says_which_base_it_is_for(
    alice_client, pair, make_expert, base_model
):
    other = BaseModel.objects.get(pk=base_model.pk)
    other.pk, other.slug = None, "other"
    other.save()
    make_expert("elsewhere", base_model=other)
    body = {"base": "tiny-llama", "prompt": "w5", "expert": "alice/python+alice/elsewhere"}
    response = alice_client.post(GENERATE, body, format="json")
    assert response.status_code == 404
    assert "trained on base model other, not tiny-llama" in str(response.json())


def test_attach_returns_the_composed_prefix(alice_client, pair):
    response = alice_client.post(
        "/api/v1/attach",
        {"base": "tiny-llama", "expert": ["alice/python", "alice/unix@1"], "prompt": "w5 w6"},
        format="json",
    )
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["expert"] == "alice/python@1+alice/unix@1"
    assert body["prefix_positions"] == 4 + 4 - 1
    tensors = load(base64.b64decode(body["safetensors_base64"]))
    assert tensors["prefix.keys"].shape[2] == 7 and tensors["prefix.gate_bias"].shape == (7,)


def test_auto_composes_when_the_prompt_s_halves_match_two_experts_and_the_setting_says(
    alice_client, make_expert, publish, settings
):
    first = " ".join(f"w{i}" for i in range(5, 13))
    second = " ".join(f"w{i}" for i in range(40, 48))
    publish(make_expert("one"), seed=1, n_latents=0, prefix_positions=4, profile_text=first * 8)
    publish(make_expert("two"), seed=2, n_latents=0, prefix_positions=4, profile_text=second * 8)
    settings.LATENTRY_AUTO_THRESHOLD = -1.0  # any match is good enough: the halves decide

    def auto(prompt):
        body = {"base": "tiny-llama", "prompt": prompt, "expert": "auto", "max_new_tokens": 2}
        return alice_client.post(GENERATE, body, format="json").json()["expert"]

    joined = f"{first} {first} {second} {second}"  # 16 tokens of each
    assert "+" not in auto(joined)  # off by default
    settings.LATENTRY_AUTO_COMPOSE = True
    assert auto(joined) == "alice/one@1+alice/two@1"  # in the prompt's order
    assert auto(f"{second} {second} {first} {first}") == "alice/two@1+alice/one@1"
    assert auto(f"{first} {first} {first} {first}") == "alice/one@1"  # one domain: one expert
    assert "+" not in auto(f"{first} {second}")  # too short to halve


# --- measured pairings -------------------------------------------------------------------------

SMALL_BENCHMARK = {"window": 64, "ahead": 4, "max_windows": 6}


@pytest.fixture
def benchmarked_pair(
    make_expert, publish, sam, base_model, eager, django_capture_on_commit_callbacks
):
    """alice/py (Python) and alice/sh (Shell), static prefixes, each measured alone on a
    benchmark of each domain (tasks run eagerly)."""
    from registry.models import Domain
    from tests.factories import make_dataset, phrase_text
    from training.models import Benchmark

    shell = Domain.objects.create(slug="shell", name="Shell")
    versions = {}
    for name, domain, seed in [("py", None, 1), ("sh", shell, 2)]:
        expert = make_expert(name, **({"domain": domain} if domain else {}))
        with django_capture_on_commit_callbacks(execute=True):
            versions[name] = publish(expert, seed=seed, n_latents=0, prefix_positions=4)
    for domain, seed in [(versions["py"].expert.domain, 1), (shell, 2)]:
        text = phrase_text(length=1200, seed=seed)
        dataset = make_dataset(sam, f"{domain.slug}-bench", text, base_model=base_model)
        with django_capture_on_commit_callbacks(execute=True):
            Benchmark.add(sam, domain, dataset, **SMALL_BENCHMARK)
    return versions


def test_a_pairing_is_measured_on_both_domains_and_shows_what_composing_keeps(
    alice_client, anon_client, benchmarked_pair, django_capture_on_commit_callbacks
):
    from training.models import BenchmarkResult, EvaluationJob

    alone = BenchmarkResult.objects.count()
    assert alone == 4  # each version alone on each benchmark
    with django_capture_on_commit_callbacks(execute=True):
        response = alice_client.post(
            "/api/v1/experts/alice/py/pairings/", {"partner": "alice/sh@1"}, format="json"
        )
    assert response.status_code == 202, response.json()
    job = EvaluationJob.objects.get(pk=response.json()["id"])
    assert job.status == job.SUCCEEDED and response.json()["partner"] == "alice/sh@1"
    assert BenchmarkResult.objects.count() == alone  # a pairing's figures are its own
    (pairing,) = anon_client.get("/api/v1/experts/alice/sh/pairings/").json()
    assert pairing["composition"] == "alice/py@1+alice/sh@1"
    rows = {row["domain"]: row for row in pairing["benchmarks"]}
    assert set(rows) == {"python", "shell"} and rows["shell"]["part"] == "alice/sh@1"
    own = BenchmarkResult.objects.get(
        version=benchmarked_pair["sh"], benchmark__domain__slug="shell"
    ).reduction_pct
    assert rows["shell"]["part_alone_pct"] == round(own, 2)
    keep = rows["shell"]["reduction_pct"] / round(own, 2)
    assert rows["shell"]["keep"] == pytest.approx(keep, abs=1e-3)
    assert "dataset" not in rows["shell"]  # the benchmark's text is staff's: its domain only
    page = anon_client.get("/experts/alice/py/").content.decode()
    assert "alice/py@1+alice/sh@1" in page and 'aria-label="measured pairings"' in page
    again = alice_client.post(
        "/api/v1/experts/alice/py/pairings/", {"partner": "alice/sh"}, format="json"
    )
    assert again.json()["id"] == job.pk  # measured once


def test_a_pairing_is_refused_when_it_cannot_compose_or_is_not_yours(
    alice_client, bob_client, benchmarked_pair, make_expert, publish
):
    url = "/api/v1/experts/alice/py/pairings/"
    publish(make_expert("latent"), seed=4)
    publish(make_expert("hidden", visibility="private"), seed=5, n_latents=0, prefix_positions=4)
    cases = [
        (bob_client, {"partner": "alice/sh"}, 403, "only the expert's owner"),
        (alice_client, {"partner": "alice/latent"}, 400, "only static prefixes compose"),
        (alice_client, {"partner": "alice/py"}, 400, "two different experts"),
        (alice_client, {"partner": "alice/nothing"}, 404, "alice/nothing has no such"),
        (alice_client, {"partner": "alice/sh@7"}, 404, "no such ready version"),
        (alice_client, {"partner": "not a name"}, 400, "owner/name"),
        (alice_client, {"partner": "alice/sh", "extra": 1}, 400, "unknown field"),
    ]
    for client, body, status, says in cases:
        response = client.post(url, body, format="json")
        assert response.status_code == status, (body, response.json())
        assert says in str(response.json()), (body, response.json())
    bob_reads = bob_client.get("/api/v1/experts/alice/hidden/pairings/")
    assert bob_reads.status_code == 404


def test_pairings_count_against_the_measurement_cap(alice_client, benchmarked_pair, settings):
    from training.models import EvaluationJob, Job

    settings.LATENTRY_MAX_QUEUED_MEASUREMENTS = 1
    EvaluationJob.objects.update(status=Job.QUEUED, created_by=benchmarked_pair["py"].expert.owner)
    response = alice_client.post(
        "/api/v1/experts/alice/py/pairings/", {"partner": "alice/sh"}, format="json"
    )
    assert response.status_code == 429 and "measurements queued" in response.json()["detail"]


def test_try_it_composes_the_expert_with_others_and_says_why_not(settings, pair):
    from django.test import Client

    settings.LATENTRY_ANONYMOUS_GENERATION = True  # as make run has it (test_anonymous.py)
    page = Client().get("/experts/alice/python/")
    assert 'name="compose_with"' in page.text

    def try_it(compose_with):
        body = {"prompt": "w5 w6", "max_new_tokens": 3, "compose_with": compose_with}
        return Client().post("/experts/alice/python/try/", body, HTTP_HX_REQUEST="true")

    composed = try_it(" alice/unix@1 ")
    assert composed.status_code == 200
    assert "With alice/python@1+alice/unix@1" in composed.text
    assert "With alice/python@1<" in try_it("").text.replace("</h3>", "<")  # alone
    missing = try_it("alice/nope")
    assert missing.status_code == 400 and "alice/nope" in missing.text
    twice = try_it("alice/python")
    assert twice.status_code == 400 and "twice" in twice.text
