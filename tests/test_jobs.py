"""Training and evaluation jobs through the API, run in-process (Celery eager mode).

Real worker processes (kill, resume, cancel, storage faults) are in test_job_workers.py.
"""

import io
import time
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from registry import storage
from registry.models import Expert, ExpertVersion
from tests.factories import SMALL_JOB, make_dataset, phrase_text, stored_keys
from training import datasets, runner, tasks
from training.models import (
    Benchmark,
    EvaluationJob,
    Job,
    TrainingJob,
    another_users_turn,
    fair_order,
)

JOBS = "/api/v1/jobs/training/"
EVALS = "/api/v1/jobs/evaluation/"


@pytest.fixture
def words(alice, base_model):
    return make_dataset(alice, base_model=base_model)


def start(client, expert="words-expert", params=None, datasets=("words",), **fields):
    body = {"expert": expert, "datasets": list(datasets), "params": params or SMALL_JOB, **fields}
    return client.post(JOBS, body, format="json")


def test_a_training_job_publishes_one_version_then_evaluates_it(
    alice_client, words, domain, eager, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = start(alice_client, domain="python")
    assert response.status_code == 202, response.json()
    assert response["Location"] == f"http://testserver{JOBS}{response.json()['id']}/"
    job = TrainingJob.objects.get(pk=response.json()["id"])
    assert job.status == Job.SUCCEEDED, job.error
    assert (job.device, job.attempts, job.step) == ("cpu", 1, 30)
    assert job.history and job.history[-1][0] == 30
    version = ExpertVersion.objects.get(training_job=job)
    assert (version.expert.full_name, version.number, version.n_latents) == (
        "alice/words-expert",
        1,
        2,
    )
    assert len(version.routing_profile) == 32
    assert not job.checkpoint_key and not [k for k in stored_keys() if "checkpoint" in k]
    evaluation = EvaluationJob.objects.get(version=version)
    assert evaluation.status == Job.SUCCEEDED, evaluation.error
    version.refresh_from_db()
    measured = version.metrics["evaluations"][0]
    assert measured["dataset"] == "alice/words" and measured["split"] == "heldout"
    assert len(measured["ppl_expert_by_position"]) == 4 and measured["ppl_base"] > 1
    assert Expert.objects.get(pk=version.expert_id).measured_gain == pytest.approx(
        measured["reduction_pct"], abs=1e-3
    )
    detail = alice_client.get(f"{JOBS}{job.pk}/").json()
    assert detail["version"] == 1 and detail["progress_pct"] == 100.0


def test_a_job_delivered_again_never_makes_a_second_version(alice, words, make_expert, eager):
    expert = make_expert("again")
    job = TrainingJob.start(alice, expert, [words], SMALL_JOB)
    tasks.train_expert.apply((job.pk,))
    tasks.train_expert.apply((job.pk,))  # a late duplicate: the job already ended
    # A crash after publishing but before recording success: delivered again, it only ends.
    TrainingJob.objects.filter(pk=job.pk).update(status=Job.RUNNING, heartbeat_at=None)
    tasks.train_expert.apply((job.pk,))
    job.refresh_from_db()
    assert job.status == Job.SUCCEEDED
    assert ExpertVersion.objects.filter(expert=expert).count() == 1


def test_a_dataset_too_short_fails_the_job_with_a_readable_error(
    alice, base_model, make_expert, eager
):
    tiny = make_dataset(alice, "short", text=phrase_text(length=30))
    job = TrainingJob.start(alice, make_expert("short"), [tiny], SMALL_JOB)
    tasks.train_expert.apply((job.pk,))
    job.refresh_from_db()
    assert job.status == Job.FAILED
    assert "fewer than one window" in job.error
    assert not ExpertVersion.objects.exists()


@pytest.mark.parametrize(
    "params, field",
    [
        ({"n_latents": 0, "prefix_positions": 0}, "n_latents"),
        ({"prefix_positions": 999}, "prefix_positions"),
        ({"lr": 5.0}, "lr"),
        ({"steps": 0}, "steps"),
        ({"kind": "qlora"}, "kind"),
        ({"learning_rate": 0.1}, "learning_rate"),
        ({"window": 32, "ahead_tokens": 16, "positions_per_window": 8}, "window"),
        # over the tiny model's 256-token context (a step's work within its bound)
        ({"window": 4096, "windows_per_step": 1, "positions_per_window": 4}, "window"),
    ],
)
def test_out_of_bounds_hyper_parameters_get_400_naming_them(
    alice_client, words, domain, params, field
):
    response = start(alice_client, params=params, domain="python")
    assert response.status_code == 400
    assert field in response.json()["params"]
    assert not TrainingJob.objects.exists() and not Expert.objects.exists()


def test_jobs_need_your_expert_usable_datasets_and_a_domain_for_new_experts(
    alice_client, bob_client, words, make_expert, domain
):
    make_expert("taken")
    assert start(bob_client, expert="alice/taken", domain="python").status_code == 400
    assert "words" in str(start(bob_client, datasets=["alice/words"], domain="python").json())
    missing_domain = start(alice_client, expert="brand-new")
    assert missing_domain.status_code == 400 and "domain" in missing_domain.json()
    assert not TrainingJob.objects.exists()


def test_jobs_are_private_to_their_creator_and_cancel_ends_a_queued_job(
    alice_client, bob_client, words, domain
):
    job_id = start(alice_client, domain="python").json()["id"]
    assert bob_client.get(f"{JOBS}{job_id}/").status_code == 404
    assert bob_client.get(JOBS).json()["count"] == 0
    assert bob_client.post(f"{JOBS}{job_id}/cancel/").status_code == 404
    cancelled = alice_client.post(f"{JOBS}{job_id}/cancel/")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert alice_client.post(f"{JOBS}{job_id}/cancel/").status_code == 409


def test_evaluation_jobs_are_for_owners_and_staff(
    alice_client, bob_client, alice, words, make_expert, expert_file, eager
):
    expert = make_expert("uploaded")
    from tests.factories import upload

    assert upload(alice_client, expert, expert_file()).status_code == 201
    body = {"expert": "alice/uploaded", "datasets": ["alice/words"], "window": 64, "ahead": 4}
    assert bob_client.post(EVALS, body, format="json").status_code == 400  # not bob's dataset
    make_dataset(alice, "shared", public=True)
    shared = {**body, "datasets": ["alice/shared"]}
    assert bob_client.post(EVALS, shared, format="json").status_code == 403
    assert alice_client.post(EVALS, {**body, "version": 9}, format="json").status_code == 409
    response = alice_client.post(EVALS, body, format="json")
    assert response.status_code == 202, response.json()
    assert response["Location"].endswith(f"{EVALS}{response.json()['id']}/")


def test_the_demo_seed_queues_one_python_docs_job(django_user_model, base_model):
    from django.core.management import call_command

    from training.management.commands import seed_demo_job

    django_user_model.objects.create_user("demo", is_staff=True)  # as seed_demo makes it
    out = io.StringIO()
    call_command("seed_demo_job", "--base-model", "tiny-llama", "--minutes", "1", stdout=out)
    call_command("seed_demo_job", "--base-model", "tiny-llama", stdout=out)
    job = TrainingJob.objects.get()
    assert job.expert.full_name == "demo/python-docs" and job.status == Job.QUEUED
    assert job.params["time_budget_s"] == 60
    # a step count rules the demo job, so that a busy machine trains it as a quiet one would
    assert job.params["steps"] == seed_demo_job.DEMO_STEPS
    dataset = job.datasets.get()
    assert dataset.public and dataset.documents > 50 and dataset.token_count > 0
    assert "exists" in out.getvalue()
    benchmark = Benchmark.objects.get()  # the held-out tail, which the job never trains on
    assert benchmark.domain.slug == "python" and not benchmark.dataset.public
    held_out = runner.dataset_splits(dataset)[1]
    assert datasets.read_texts(benchmark.dataset) == held_out


def test_a_worker_that_lost_its_job_to_another_stops_writing(alice, words, make_expert):
    from datetime import timedelta

    from django.utils import timezone

    from training.models import JobLost

    job = TrainingJob.start(alice, make_expert("contested"), [words], SMALL_JOB)
    first = TrainingJob.claim(job.pk, "a@host", "cpu")
    TrainingJob.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    second = TrainingJob.claim(job.pk, "b@host", "cpu")
    assert (second.worker, second.attempts) == ("b@host", 2)
    with pytest.raises(JobLost):
        first.report(step=5)
    assert first.finish(Job.FAILED, error="stale") is False
    second.report(step=7)
    assert second.finish(Job.SUCCEEDED) is True
    job.refresh_from_db()
    assert (job.status, job.step, job.worker) == (Job.SUCCEEDED, 7, "b@host")


def test_a_job_that_keeps_killing_workers_fails_after_max_attempts(
    alice, words, make_expert, settings
):
    settings.LATENTRY_JOB_MAX_ATTEMPTS = 2
    job = TrainingJob.start(alice, make_expert("crashy"), [words], SMALL_JOB)
    TrainingJob.objects.filter(pk=job.pk).update(attempts=2)
    assert TrainingJob.claim(job.pk, "w@host", "cpu") is None
    job.refresh_from_db()
    assert job.status == Job.FAILED and "gave up after 2 attempts" in job.error
    assert job.retry() is True and job.status == Job.QUEUED and job.attempts == 0
    assert job.retry() is False  # queued: nothing to retry


@pytest.mark.parametrize(
    "body, field",
    [
        ({"temperature": 1e-5}, "temperature"),
        ({"temperature": 1.0, "top_p": 0}, "top_p"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_sampling_settings_that_would_break_a_batch_are_refused(
    alice_client, base_model, body, field
):
    response = alice_client.post(
        "/api/v1/generate", {"base": "tiny-llama", "prompt": "w5", **body}, format="json"
    )
    assert response.status_code == 400 and field in response.json()


def test_a_job_page_in_the_admin_cannot_be_saved_over_the_worker(
    admin_client, words, alice, make_expert
):
    expert = make_expert("read-only")
    job = TrainingJob.start(alice, expert, [words], SMALL_JOB)
    TrainingJob.objects.filter(pk=job.pk).update(step=9)
    page = admin_client.get(f"/admin/training/trainingjob/{job.pk}/change/")
    assert page.status_code == 200 and 'name="_save"' not in page.content.decode()
    # Everything the add form takes, as a stale page would send it back.
    posted = admin_client.post(
        f"/admin/training/trainingjob/{job.pk}/change/",
        {"expert": expert.pk, "datasets": [words.pk], "params": '{"steps": 1}'},
    )
    assert posted.status_code == 403
    job.refresh_from_db()
    assert job.step == 9 and job.params["steps"] == SMALL_JOB["steps"]


def corrupt_its_bytes(version):
    path = Path(storage.artifacts().path(version.artifact_key))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def change_its_base_model(version):
    """The header no longer matches the base model's record (checked as serving checks it)."""
    base = version.expert.base_model
    type(base).objects.filter(pk=base.pk).update(num_layers=base.num_layers + 1)


@pytest.mark.parametrize(
    "break_it, reason", [(corrupt_its_bytes, "sha256"), (change_its_base_model, "layers")]
)
def test_an_evaluation_that_cannot_load_a_version_rejects_it(
    alice, words, make_expert, publish, eager, django_capture_on_commit_callbacks, break_it, reason
):
    version = publish(make_expert("broken"))
    break_it(version)
    with django_capture_on_commit_callbacks(execute=True):
        job = EvaluationJob.start(alice, version, [words])
    job.refresh_from_db()
    version.refresh_from_db()
    assert job.status == Job.FAILED and reason in job.error
    assert version.status == version.REJECTED and reason in version.status_reason


def test_no_job_reads_more_datasets_than_the_cap(alice, make_expert, publish):
    version = publish(make_expert("capped"))
    many = [make_dataset(alice, f"d{i}", text="w2 w3") for i in range(Job.MAX_DATASETS + 1)]
    with pytest.raises(ValidationError, match="at most 20 datasets"):
        EvaluationJob.start(alice, version, many)
    with pytest.raises(ValidationError, match="at most 20 datasets"):
        TrainingJob.start(alice, version.expert, many, SMALL_JOB)
    assert not EvaluationJob.objects.exists() and not TrainingJob.objects.exists()


def test_an_evaluation_never_reads_data_the_owner_may_not(
    alice_client, alice, sam, words, make_expert, expert_file, domain, eager
):
    from tests.factories import client_for, upload

    expert = make_expert("uploaded")
    assert upload(alice_client, expert, expert_file()).status_code == 201
    version = expert.versions.get()
    staff_private = make_dataset(sam, "staff-notes")  # staff may use it; alice may not
    body = {"expert": "alice/uploaded", "datasets": ["sam/staff-notes"], "window": 64, "ahead": 4}
    response = client_for(sam).post(EVALS, body, format="json")
    assert response.status_code == 400 and "staff-notes" in str(response.json())
    assert not EvaluationJob.objects.exists()
    # the admin action picks the domain's datasets the owner may read, and no others
    from training.admin import evaluation_datasets

    Dataset = type(staff_private)
    Dataset.objects.filter(pk__in=[staff_private.pk, words.pk]).update(domain=domain)
    assert evaluation_datasets(version) == [words]


def test_evaluation_windows_are_bounded_by_the_base_models_context(
    alice_client, alice, words, make_expert, expert_file, base_model, eager
):
    from tests.factories import upload

    expert = make_expert("uploaded")
    assert upload(alice_client, expert, expert_file()).status_code == 201
    body = {"expert": "alice/uploaded", "datasets": ["alice/words"], "ahead": 4}
    too_wide = {**body, "window": base_model.context_length + 1}
    response = alice_client.post(EVALS, too_wide, format="json")
    assert response.status_code == 400 and "context" in str(response.json())
    too_far = {**body, "window": 64, "ahead": 60}
    assert alice_client.post(EVALS, too_far, format="json").status_code == 400
    version = expert.versions.get()
    version.config = {"training": {"window": 10**12, "ahead_tokens": 10**9}}  # the uploader's
    params = EvaluationJob.as_trained(version)
    assert params["window"] == base_model.context_length
    assert params["ahead"] == base_model.context_length - 16


def test_one_user_may_have_only_so_many_jobs_queued_or_running(
    settings, alice_client, bob_client, words, bob, domain
):
    settings.LATENTRY_MAX_ACTIVE_JOBS = 2
    make_dataset(bob, "words")
    for n in range(2):  # not eager: they stay queued
        assert start(alice_client, expert=f"e{n}", domain="python").status_code == 202
    refused = start(alice_client, expert="e2", domain="python")
    assert refused.status_code == 429 and "2 jobs queued or running" in refused.json()["detail"]
    assert start(bob_client, domain="python").status_code == 202  # others are not held up
    job = TrainingJob.objects.filter(created_by__username="alice").first()
    assert alice_client.post(f"{JOBS}{job.pk}/cancel/").status_code == 200
    assert start(alice_client, expert="e2", domain="python").status_code == 202  # room again


def test_starting_jobs_is_rate_limited(settings, alice_client, words, domain):
    settings.LATENTRY_THROTTLE_RATES = {**settings.LATENTRY_THROTTLE_RATES, "job": "2/hour"}
    settings.LATENTRY_MAX_ACTIVE_JOBS = 0
    answers = [start(alice_client, expert=f"e{n}", domain="python") for n in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 429]
    assert alice_client.get(JOBS).status_code == 200  # reading is not limited


def test_a_job_gets_the_default_time_budget_and_no_more_than_the_maximum(
    settings, alice_client, words, domain
):
    settings.LATENTRY_JOB_TIME_BUDGET_S = 900
    settings.LATENTRY_JOB_MAX_TIME_BUDGET_S = 1800
    assert start(alice_client, domain="python").status_code == 202
    assert TrainingJob.objects.get().params["time_budget_s"] == 900
    too_long = start(alice_client, expert="e1", params={**SMALL_JOB, "time_budget_s": 1801})
    assert too_long.status_code == 400
    assert "must be at most 1800 s" in str(too_long.json())
    unbounded = start(alice_client, expert="e1", params={**SMALL_JOB, "time_budget_s": 0})
    assert unbounded.status_code == 400


def test_the_work_of_one_training_step_is_bounded(settings, alice_client, words, domain):
    settings.LATENTRY_MAX_STEP_TOKENS = 4 * 4 * 64  # SMALL_JOB's 2 windows x 4 positions x 64
    huge = {**SMALL_JOB, "windows_per_step": 8}
    response = start(alice_client, domain="python", params=huge)
    assert response.status_code == 400
    assert "over the limit of 1024 tokens a step" in str(response.json())
    assert start(alice_client, domain="python", params=SMALL_JOB).status_code == 202


def test_the_queue_is_fair_across_users(settings, alice, bob, words, make_expert, monkeypatch):
    # alice queues three jobs, then bob one; alice's first is running.
    mine = [TrainingJob.start(alice, make_expert(f"a{n}"), [words], SMALL_JOB) for n in range(3)]
    bobs = make_dataset(bob, "words")
    theirs = TrainingJob.start(bob, make_expert("b0", owner=bob), [bobs], SMALL_JOB)
    TrainingJob.objects.filter(pk=mine[0].pk).update(status=Job.RUNNING, started_at=timezone.now())
    order = [job.pk for job in fair_order()]
    assert order == [theirs.pk, mine[1].pk, mine[2].pk]
    sent = []
    monkeypatch.setattr(
        tasks.train_expert,
        "apply_async",
        lambda args, kwargs, countdown, **options: sent.append((kwargs, countdown)),
    )
    tasks.train_expert.apply((mine[1].pk,))  # bob has the turn: back to the queue
    ((kwargs, countdown),) = sent
    assert countdown == tasks.YIELD_DELAY_S and kwargs["waiting_since"] > time.time() - 60
    assert TrainingJob.objects.get(pk=mine[1].pk).status == Job.QUEUED
    long_ago = time.time() - settings.LATENTRY_JOB_MAX_YIELD_S
    tasks.train_expert.apply((mine[1].pk,), {"waiting_since": long_ago})  # no endless wait
    assert TrainingJob.objects.get(pk=mine[1].pk).status == Job.SUCCEEDED
    assert not another_users_turn(theirs)
