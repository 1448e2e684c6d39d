"""The admin panel for jobs: who sees it, what a job page shows, and the actions."""

import io

import pytest
from django.test import Client

from coprocessor.train import TrainConfig
from registry.models import ExpertVersion
from tests.factories import SMALL_JOB, make_dataset, upload
from training.models import Dataset, EvaluationJob, Job, TrainingJob

CHANGELIST = "/admin/training/trainingjob/"


@pytest.fixture
def job(alice, base_model, make_expert):
    words = make_dataset(alice)
    return TrainingJob.start(alice, make_expert("watched"), [words], SMALL_JOB)


def test_non_staff_never_see_the_admin(job, bob, client):
    assert client.get(CHANGELIST).status_code == 302
    client.force_login(bob)
    response = client.get(CHANGELIST)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert Client().get(f"{CHANGELIST}{job.pk}/change/").status_code == 302


def test_job_list_shows_status_progress_loss_and_eta(job, admin_client):
    TrainingJob.objects.filter(pk=job.pk).update(
        status=Job.RUNNING, step=12, total_steps=30, loss=2.3456, eta_s=95
    )
    page = admin_client.get(CHANGELIST).content.decode()
    assert '<progress max="100" value="40"' in page
    assert "2.3456" in page and "1m 35s" in page and "Running" in page


def test_job_page_draws_the_loss_curve_and_the_evaluation_table(
    job, admin_client, alice_client, expert_file
):
    assert upload(alice_client, job.expert, expert_file()).status_code == 201
    version = ExpertVersion.objects.get()
    ExpertVersion.objects.filter(pk=version.pk).update(
        training_job=job,
        metrics={
            "evaluations": [
                {
                    "dataset": "alice/words",
                    "split": "heldout",
                    "pairs": 12,
                    "ppl_base": 9.5,
                    "ppl_expert": 8.25,
                    "reduction_pct": 13.16,
                }
            ]
        },
    )
    TrainingJob.objects.filter(pk=job.pk).update(history=[[1, 0.1, 4.0], [10, 1.0, 3.0]])
    page = admin_client.get(f"{CHANGELIST}{job.pk}/change/").content.decode()
    assert "<svg" in page and "<polyline" in page and "training loss" in page
    assert "8.250" in page and "+13.16%" in page
    assert "version 1" in page


def test_launching_from_the_admin_validates_params_and_queues_the_job(
    alice, base_model, make_expert, admin_client, django_capture_on_commit_callbacks
):
    expert = make_expert("launched")
    words = make_dataset(alice)
    form = {"expert": expert.pk, "datasets": [words.pk]}
    bad = admin_client.post(f"{CHANGELIST}add/", {**form, "params": '{"n_latents": -1}'})
    assert bad.status_code == 200 and "n_latents" in bad.content.decode()
    assert not TrainingJob.objects.exists()
    with django_capture_on_commit_callbacks() as sent:
        ok = admin_client.post(f"{CHANGELIST}add/", {**form, "params": '{"steps": 5}'})
    assert ok.status_code == 302
    job = TrainingJob.objects.get()
    assert job.params["steps"] == 5
    assert job.params["n_latents"] == TrainConfig().expert.n_latents
    assert job.status == Job.QUEUED and len(sent) == 1


def test_launching_from_the_admin_checks_the_window_against_the_base_models_context(
    alice, base_model, make_expert, admin_client
):
    form = {"expert": make_expert("too-wide").pk, "datasets": [make_dataset(alice).pk]}
    response = admin_client.post(
        f"{CHANGELIST}add/", {**form, "params": '{"window": 4096, "windows_per_step": 1}'}
    )
    assert response.status_code == 200
    assert "at most the base model&#x27;s context (256)" in response.content.decode()
    assert not TrainingJob.objects.exists()


def test_cancel_and_retry_actions(job, admin_client):
    admin_client.post(CHANGELIST, {"action": "cancel", "_selected_action": [job.pk]})
    job.refresh_from_db()
    assert job.status == Job.CANCELLED
    admin_client.post(CHANGELIST, {"action": "retry", "_selected_action": [job.pk]})
    job.refresh_from_db()
    assert job.status == Job.QUEUED and not job.cancel_requested


def test_evaluate_this_version_action(job, admin_client, alice_client, expert_file):
    assert upload(alice_client, job.expert, expert_file()).status_code == 201
    version = ExpertVersion.objects.get()
    Dataset.objects.update(domain=job.expert.domain)
    admin_client.post(
        "/admin/registry/expertversion/",
        {"action": "evaluate", "_selected_action": [version.pk]},
    )
    evaluation = EvaluationJob.objects.get()
    assert evaluation.version == version
    assert list(evaluation.datasets.all()) == list(Dataset.objects.all())


def test_dataset_upload_in_the_admin_is_validated(alice, admin_client):
    url = "/admin/training/dataset/add/"
    form = {"owner": alice.pk, "name": "admin-set", "description": ""}
    bad = io.BytesIO(b"\xff\xfe")
    bad.name = "bad.txt"
    response = admin_client.post(url, {**form, "upload": bad})
    assert response.status_code == 200 and "not UTF-8" in response.content.decode()
    good = io.BytesIO(b"some words here")
    good.name = "good.txt"
    assert admin_client.post(url, {**form, "upload": good}).status_code == 302
    dataset = Dataset.objects.get()
    assert dataset.size == 15 and dataset.file_key.startswith("datasets/")
