"""Limits on jobs hold on every way in: the API, the training page, the admin and the demo
seeding command all start jobs through TrainingJob.start / EvaluationJob.start, which check
the active-job cap, the start rate, the time budget and the storage quota. A job on private
data publishes a private expert unless its owner asks otherwise."""

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError

from registry.models import Domain, Expert, ExpertVersion
from tests.factories import SMALL_JOB, logged_in, make_dataset
from training import tasks
from training.models import EvaluationJob, Job, JobLimitReached, TrainingJob

JOBS = "/api/v1/jobs/training/"
PAGE_FORM = {
    "time_budget_minutes": 1,
    "steps": 30,
    "n_latents": 2,
    "prefix_positions": 4,
    "lora_rank": 2,
    "window": 64,
    "ahead_tokens": 4,
    "positions_per_window": 4,
    "lr": 0.001,
}


@pytest.fixture
def words(alice, base_model):
    return make_dataset(alice, base_model=base_model)


@pytest.fixture
def one_job_at_a_time(settings):
    settings.LATENTRY_MAX_ACTIVE_JOBS = 1


@pytest.fixture
def two_starts_an_hour(settings):
    settings.LATENTRY_MAX_ACTIVE_JOBS = 0
    settings.LATENTRY_THROTTLE_RATES = {**settings.LATENTRY_THROTTLE_RATES, "job": "2/hour"}


def page_start(client, expert, datasets, **fields):
    form = {**PAGE_FORM, "datasets": [d.pk for d in datasets], **fields}
    return client.post(f"/experts/{expert.owner.username}/{expert.name}/train/", form)


def api_start(client, expert, datasets, **fields):
    body = {"expert": expert, "datasets": datasets, "params": SMALL_JOB, **fields}
    return client.post(JOBS, body, format="json")


# --- the training page ---------------------------------------------------------------------


def test_the_page_refuses_a_start_past_the_active_job_cap_with_429(
    one_job_at_a_time, alice, words, make_expert
):
    expert, client = make_expert("paged"), logged_in(alice)
    assert page_start(client, expert, [words]).status_code == 302
    refused = page_start(client, expert, [words])
    assert refused.status_code == 429
    assert "1 jobs queued or running" in refused.content.decode()
    assert TrainingJob.objects.count() == 1


def test_the_page_refuses_starts_past_the_start_rate_with_retry_after(
    two_starts_an_hour, alice, words, make_expert
):
    expert, client = make_expert("paged"), logged_in(alice)
    assert [page_start(client, expert, [words]).status_code for _ in range(2)] == [302, 302]
    refused = page_start(client, expert, [words])
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert "LATENTRY_JOB_START_RATE" in refused.content.decode()
    assert TrainingJob.objects.count() == 2


def test_the_page_and_the_api_count_against_one_start_rate(
    two_starts_an_hour, alice, alice_client, words, make_expert
):
    expert = make_expert("shared")
    assert page_start(logged_in(alice), expert, [words]).status_code == 302
    assert api_start(alice_client, "shared", ["words"]).status_code == 202
    refused = api_start(alice_client, "shared", ["words"])
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert "LATENTRY_JOB_START_RATE" in refused.json()["detail"]


def test_the_page_refuses_a_start_past_the_storage_quota(settings, alice, words, make_expert):
    settings.LATENTRY_MAX_STORED_BYTES = words.size  # full: a new version could not be kept
    refused = page_start(logged_in(alice), make_expert("full"), [words])
    assert refused.status_code == 400 and "LATENTRY_MAX_STORED_BYTES" in refused.content.decode()
    assert not TrainingJob.objects.exists()


def test_the_page_refuses_a_time_budget_past_the_maximum(settings, alice, words, make_expert):
    settings.LATENTRY_JOB_MAX_TIME_BUDGET_S = 600
    refused = page_start(logged_in(alice), make_expert("long"), [words], time_budget_minutes=11)
    assert refused.status_code == 400 and "must be at most 600 s" in refused.content.decode()
    assert not TrainingJob.objects.exists()


# --- the API -------------------------------------------------------------------------------


def test_an_api_start_past_the_cap_leaves_no_new_expert_behind(
    one_job_at_a_time, alice_client, words, domain
):
    assert api_start(alice_client, "first", ["words"], domain="python").status_code == 202
    refused = api_start(alice_client, "second", ["words"], domain="python")
    assert refused.status_code == 429 and "1 jobs queued or running" in refused.json()["detail"]
    assert list(Expert.objects.values_list("name", flat=True)) == ["first"]


# --- the models themselves: every other caller -----------------------------------------------


def test_a_direct_start_past_each_limit_is_refused(
    settings, alice, words, make_expert, publish, tmp_path
):
    settings.LATENTRY_MAX_ACTIVE_JOBS = 1
    expert = make_expert("direct")
    TrainingJob.start(alice, expert, [words], SMALL_JOB)
    with pytest.raises(JobLimitReached, match="1 jobs queued or running"):
        TrainingJob.start(alice, expert, [words], SMALL_JOB)
    version = publish(make_expert("measured"))
    with pytest.raises(JobLimitReached):
        EvaluationJob.start(alice, version, [words])
    settings.LATENTRY_MAX_ACTIVE_JOBS = 0
    settings.LATENTRY_THROTTLE_RATES = {**settings.LATENTRY_THROTTLE_RATES, "job": "2/hour"}
    EvaluationJob.start(alice, version, [words])  # the second start this hour
    with pytest.raises(JobLimitReached) as refused:
        TrainingJob.start(alice, expert, [words], SMALL_JOB)
    assert refused.value.retry_after > 0


def test_every_job_gets_a_bounded_time_budget(settings, alice, words, make_expert):
    settings.LATENTRY_JOB_TIME_BUDGET_S = 900
    settings.LATENTRY_JOB_MAX_TIME_BUDGET_S = 1800
    expert = make_expert("budget")
    job = TrainingJob.start(alice, expert, [words], SMALL_JOB)  # SMALL_JOB names no budget
    assert job.params["time_budget_s"] == 900
    for seconds in (0, 1801):
        with pytest.raises(ValidationError, match="must be at most 1800 s"):
            TrainingJob.start(alice, expert, [words], {**SMALL_JOB, "time_budget_s": seconds})
    assert TrainingJob.objects.count() == 1


def test_the_platforms_own_jobs_are_never_refused(
    one_job_at_a_time, alice, words, make_expert, publish
):
    version = publish(make_expert("trained"))
    training = TrainingJob.start(alice, version.expert, [words], SMALL_JOB)  # alice is at the cap
    assert EvaluationJob.start_after_training(training, version) is not None
    assert Job.active_count(alice) == 2  # counted, though nobody asked for it


# --- the admin -----------------------------------------------------------------------------


def test_the_admin_add_form_says_why_a_start_was_refused(
    one_job_at_a_time, alice, words, make_expert, admin_client
):
    form = {"expert": make_expert("admin").pk, "datasets": [words.pk], "params": "{}"}
    add = "/admin/training/trainingjob/add/"
    assert admin_client.post(add, form).status_code == 302
    refused = admin_client.post(add, form, follow=True)
    assert "Not started: you have 1 jobs queued or running" in refused.content.decode()
    assert TrainingJob.objects.count() == 1


def test_the_admin_evaluate_action_stops_at_the_cap_with_a_message(
    one_job_at_a_time, alice, words, make_expert, publish, admin_client
):
    versions = [publish(make_expert(name)) for name in ("one", "two")]
    words.domain = versions[0].expert.domain
    words.save()
    answer = admin_client.post(
        "/admin/registry/expertversion/",
        {"action": "evaluate", "_selected_action": [v.pk for v in versions]},
        follow=True,
    )
    assert "not queued: you have 1 jobs queued or running" in answer.content.decode()
    assert EvaluationJob.objects.count() == 1


# --- the demo seeding command --------------------------------------------------------------


@pytest.mark.parametrize(
    "limit, setting, value",
    [
        ("jobs queued or running", "LATENTRY_MAX_ACTIVE_JOBS", 1),
        ("LATENTRY_JOB_START_RATE", "LATENTRY_THROTTLE_RATES", {"job": "1/hour"}),
        ("must be at most", "LATENTRY_JOB_MAX_TIME_BUDGET_S", 60),
    ],
)
def test_the_demo_seeding_command_stops_at_each_limit(
    settings, django_user_model, base_model, limit, setting, value
):
    demo = django_user_model.objects.create_user("demo", is_staff=True)
    setattr(settings, setting, value)
    if setting != "LATENTRY_JOB_MAX_TIME_BUDGET_S":  # the demo user used their room already
        own = make_dataset(demo, "own", base_model=base_model)
        TrainingJob.start(demo, first_expert(demo, base_model), [own], SMALL_JOB)
    with pytest.raises(CommandError, match=f"not queued: .*{limit}"):
        call_command("seed_demo_job", base_model=base_model.slug, minutes=2)
    assert not TrainingJob.objects.filter(expert__name="python-docs").exists()


def first_expert(owner, base_model):
    domain, _ = Domain.objects.get_or_create(slug="python", defaults={"name": "Python"})
    return Expert.objects.create(owner=owner, name="first", domain=domain, base_model=base_model)


# --- private data in, private expert out -----------------------------------------------------


def test_an_api_start_on_private_data_makes_a_private_expert_unless_asked(
    alice_client, alice, words, domain, base_model
):
    make_dataset(alice, "open", public=True, base_model=base_model)
    assert api_start(alice_client, "secret", ["words"], domain="python").status_code == 202
    assert Expert.objects.get(name="secret").visibility == Expert.PRIVATE
    assert TrainingJob.objects.get(expert__name="secret").visibility == Expert.PRIVATE
    asked = api_start(alice_client, "shown", ["words"], domain="python", visibility="public")
    assert asked.status_code == 202 and asked.json()["visibility"] == "public"
    assert Expert.objects.get(name="shown").visibility == Expert.PUBLIC
    assert api_start(alice_client, "open", ["open"], domain="python").status_code == 202
    assert Expert.objects.get(name="open").visibility == Expert.PUBLIC
    assert TrainingJob.objects.get(expert__name="open").visibility == ""  # left as it is


def test_the_page_takes_the_visibility_and_defaults_to_private_on_private_data(
    alice, words, make_expert
):
    expert, client = make_expert("paged"), logged_in(alice)
    form = client.get("/experts/alice/paged/train/").content.decode()
    assert "Private if a dataset is private" in form
    assert page_start(client, expert, [words]).status_code == 302
    assert page_start(client, expert, [words], visibility="unlisted").status_code == 302
    assert [j.visibility for j in TrainingJob.objects.order_by("pk")] == ["private", "unlisted"]


def test_a_public_expert_trained_on_private_data_is_private_when_its_version_appears(
    alice, words, make_expert, eager
):
    expert = make_expert("was-public")
    job = TrainingJob.start(alice, expert, [words], SMALL_JOB)
    assert Expert.objects.get(pk=expert.pk).visibility == Expert.PUBLIC  # until it publishes
    tasks.train_expert.apply((job.pk,))
    job.refresh_from_db()
    assert job.status == Job.SUCCEEDED, job.error
    assert ExpertVersion.objects.filter(expert=expert).exists()
    assert Expert.objects.get(pk=expert.pk).visibility == Expert.PRIVATE
