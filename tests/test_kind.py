"""One word for what an expert is: "prefix" (a static prefix alone), "lora" or "full" (with
latents, its coprocessor's kind), alike in the config, the file, the job and the API."""

import pytest

from coprocessor.expert import CoprocessorConfig
from registry.models import ExpertVersion
from tests.factories import SMALL_JOB, make_dataset
from training import tasks
from training.models import Job, TrainingJob

JOBS = "/api/v1/jobs/training/"


def test_an_expert_without_latents_is_a_prefix_whatever_it_was_called():
    assert CoprocessorConfig(n_latents=0, prefix_positions=4, kind="lora").kind == "prefix"
    assert CoprocessorConfig(n_latents=2).kind == "lora"
    with pytest.raises(ValueError, match="coprocessor of kind lora or full, not 'prefix'"):
        CoprocessorConfig(n_latents=2, kind="prefix")


def test_a_prefix_job_says_prefix_in_its_params_its_file_and_the_api(
    alice, alice_client, base_model, make_expert, eager
):
    params = {**SMALL_JOB, "n_latents": 0}
    params.pop("evaluations")
    job = TrainingJob.start(alice, make_expert("p"), [make_dataset(alice)], {**params, "steps": 3})
    tasks.train_expert.apply((job.pk,))
    job.refresh_from_db()
    assert job.status == Job.SUCCEEDED, job.error
    version = ExpertVersion.objects.get(training_job=job)
    assert version.kind == "prefix"
    assert version.config["coprocessor"]["kind"] == "prefix"
    shown = alice_client.get(f"/api/v1/experts/alice/p/versions/{version.number}/").json()
    assert shown["kind"] == "prefix"


@pytest.mark.parametrize(
    "params, kind",
    [
        ({"n_latents": 0}, "prefix"),
        ({"n_latents": 2}, "lora"),
        ({"n_latents": 2, "kind": "full"}, "full"),
    ],
)
def test_a_job_s_kind_defaults_from_its_latents(
    alice_client, base_model, alice, domain, params, kind
):
    make_dataset(alice)
    body = {"expert": "k", "datasets": ["words"], "domain": "python", "params": params}
    response = alice_client.post(JOBS, body, format="json")
    assert response.status_code == 202, response.json()
    assert response.json()["params"]["kind"] == kind


@pytest.mark.parametrize(
    "params", [{"n_latents": 2, "kind": "prefix"}, {"n_latents": 0, "kind": "lora"}]
)
def test_a_kind_that_contradicts_the_latents_is_400(
    alice_client, base_model, alice, domain, params
):
    make_dataset(alice)
    body = {"expert": "k", "datasets": ["words"], "domain": "python", "params": params}
    response = alice_client.post(JOBS, body, format="json")
    assert response.status_code == 400
    assert "prefix is an expert without latents" in response.json()["params"]["kind"][0]
    assert not TrainingJob.objects.exists()
