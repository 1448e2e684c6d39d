"""An expert whose values are finite and still too large for the base model's arithmetic is
caught wherever it meets D: refused at upload (the probe), answered by the plain model with its
version rejected at serving, and an evaluation of it fails with the reason."""

import hashlib
import io

import pytest

from coprocessor.generate import NOT_FINITE, RunningBatch
from inference import service
from registry.models import ExpertVersion
from tests.factories import client_for, expert_bytes, make_dataset, scaled, stored_keys, upload
from training.models import EvaluationJob, Job

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_pool")]

# Where the large values sit, and how large: a static prefix's values, a LoRA expert's soft
# tokens (its coprocessor's own pass overflows) and its latent head (the latents do).
BROKEN = {
    "prefix-values": (dict(n_latents=0, prefix_positions=4), "prefix.values", 1e30),
    "soft-tokens": (dict(n_latents=2), "soft_tokens", 1e25),
    "latent-head": (dict(n_latents=2), "latent_head.proj", 1e35),
}


@pytest.fixture
def overflowing(decoder, base_model, tmp_path):
    def make(case="prefix-values", scale=None):
        config, names, large = BROKEN[case]
        data = expert_bytes(decoder[0], base_model.fingerprint, 0, tmp_path, **config)
        return scaled(data, scale or large, names)

    return make


@pytest.fixture
def published_unprobed(settings, make_expert):
    """Publish bytes as a ready version the way a process that does not probe would."""

    def publish(data, name="big"):
        settings.LATENTRY_PROBE_UPLOADS = False
        return ExpertVersion.publish(
            make_expert(name),
            io.BytesIO(data),
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
        )

    return publish


def plain_answer(alice):
    ask = service.Ask(base="tiny-llama", prompt="w5 w6", max_new_tokens=6)
    return service.run(ask, alice)


@pytest.mark.parametrize("case", BROKEN)
def test_the_upload_probe_refuses_an_expert_that_overflows_the_base_model(
    alice_client, make_expert, overflowing, case
):
    response = upload(alice_client, make_expert(), overflowing(case))
    assert response.status_code == 400
    assert "breaks the base model's numbers" in response.json()["file"][0]
    assert not ExpertVersion.objects.exists()
    assert stored_keys() == []


def test_large_values_that_do_not_overflow_are_published(alice_client, make_expert, overflowing):
    response = upload(alice_client, make_expert(), overflowing("prefix-values", scale=1e3))
    assert response.status_code == 201, response.json()


def test_a_version_that_breaks_the_numbers_is_served_plain_and_rejected(
    alice, overflowing, published_unprobed
):
    version = published_unprobed(overflowing())
    ask = service.Ask(base="tiny-llama", expert="alice/big", prompt="w5 w6", max_new_tokens=6)
    answer = service.run(ask, alice)
    assert not answer.augmented and NOT_FINITE in answer.reason
    assert answer.token_ids == plain_answer(alice).token_ids
    version.refresh_from_db()
    assert version.status == ExpertVersion.REJECTED
    assert NOT_FINITE in version.status_reason and "while serving" in version.status_reason


def test_a_chat_with_such_a_version_answers_plain_flagged_and_rejects_it(
    alice, overflowing, published_unprobed
):
    version = published_unprobed(overflowing("soft-tokens"))
    body = {"model": "tiny-llama:alice/big", "messages": [{"role": "user", "content": "w5 w6"}]}
    # Greedy: OpenAI's default temperature of 1 samples, and the first token may end the text.
    body["temperature"] = 0
    response = client_for(alice).post("/v1/chat/completions", body, format="json")
    assert response.status_code == 200
    assert response.json()["latentry"]["augmented"] is False
    assert response.json()["choices"][0]["message"]["content"]
    version.refresh_from_db()
    assert version.status == ExpertVersion.REJECTED


def test_a_row_whose_logits_stop_being_finite_later_rejects_its_version(
    monkeypatch, alice, make_expert, publish
):
    version = publish(make_expert("flaky"))
    step = RunningBatch.step

    def breaking_step(batch):
        for row in batch.rows:
            if row.expert is not None and len(row.tokens) >= 2:
                row.end("error", NOT_FINITE)
        return batch.retire() + step(batch)

    monkeypatch.setattr(RunningBatch, "step", breaking_step)
    ask = service.Ask(base="tiny-llama", expert="alice/flaky", prompt="w5 w6", max_new_tokens=6)
    answer = service.run(ask, alice)
    assert not answer.augmented and NOT_FINITE in answer.reason
    version.refresh_from_db()
    assert version.status == ExpertVersion.REJECTED


def test_an_evaluation_of_such_a_version_fails_with_the_reason_and_no_sql(
    alice, base_model, overflowing, published_unprobed, eager, django_capture_on_commit_callbacks
):
    version = published_unprobed(overflowing())
    words = make_dataset(alice, base_model=base_model)
    with django_capture_on_commit_callbacks(execute=True):
        job = EvaluationJob.start(alice, version, [words])
    job.refresh_from_db()
    assert job.status == Job.FAILED
    assert "overflow" in job.error
    assert not any(word in job.error.upper() for word in ("SELECT", "INSERT", "UPDATE", "SQL"))
