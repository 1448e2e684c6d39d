"""A training job stops in time: its validation curve, what it kept and why it stopped, in
the API, on the job page and in the version it publishes; a prefix sized to its data; the
objective as a parameter on every way in."""

import pytest

from coprocessor.expert import prefix_positions_for
from registry.models import ExpertVersion
from tests.factories import SMALL_JOB, logged_in, make_dataset
from training import tasks
from training.models import Job, TrainingJob

JOBS = "/api/v1/jobs/training/"
WATCHED = {**SMALL_JOB, "n_latents": 0, "evaluations": 5, "patience": 2, "steps": 20}


@pytest.fixture
def words(alice, base_model):
    return make_dataset(alice, base_model=base_model)


def run(job):
    tasks.train_expert.apply((job.pk,))
    job.refresh_from_db()
    assert job.status == Job.SUCCEEDED, job.error
    return job


@pytest.mark.parametrize(
    "tokens, positions",
    [(1_000, 16), (15_000, 32), (104_746, 64), (743_551, 128), (10**8, 256)],
)
def test_the_prefix_grows_with_the_training_text(tokens, positions):
    assert prefix_positions_for(tokens) == positions


def test_a_watched_job_shows_its_checks_what_it_kept_and_why_it_stopped(
    alice, alice_client, words, make_expert, eager
):
    job = run(TrainingJob.start(alice, make_expert("watched"), [words], WATCHED))
    steps = [check["step"] for check in job.validation]
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 3
    assert job.stopped in ("done", "plateau", "harm")
    assert job.kept_step in steps[1:]
    assert job.within_harm_bound is not None
    assert f"kept step {job.kept_step}" in job.outcome
    detail = alice_client.get(f"{JOBS}{job.pk}/").json()
    assert detail["validation"] == job.validation
    assert (detail["stopped"], detail["kept_step"], detail["outcome"]) == (
        job.stopped,
        job.kept_step,
        job.outcome,
    )
    version = ExpertVersion.objects.get(training_job=job)
    assert job.outcome in version.changelog
    page = logged_in(alice).get(f"/jobs/{job.pk}/").content.decode()
    assert "held-out slice" in page and "reference text" in page
    assert f"kept step {job.kept_step}" in page


def test_a_job_that_cannot_stay_within_the_harm_bound_publishes_and_says_so(
    alice, alice_client, words, make_expert, eager, settings
):
    settings.LATENTRY_HARM_BOUND_PCT = -100.0  # no checkpoint can stay within it
    job = run(TrainingJob.start(alice, make_expert("harmful"), [words], WATCHED))
    assert job.within_harm_bound is False and job.stopped == "harm"
    safest = min(job.validation[1:], key=lambda check: check["harm_pct"])
    assert job.kept_step == safest["step"]
    assert "No checkpoint stayed within the -100% bound" in job.outcome
    assert alice_client.get(f"{JOBS}{job.pk}/").json()["within_harm_bound"] is False
    page = logged_in(alice).get(f"/jobs/{job.pk}/").content.decode()
    assert 'class="outcome warning"' in page
    assert "No checkpoint stayed within" in ExpertVersion.objects.get(training_job=job).changelog


def test_a_job_that_names_no_prefix_size_gets_one_sized_to_its_text(
    alice, words, make_expert, eager
):
    params = {key: value for key, value in WATCHED.items() if key != "prefix_positions"}
    job = run(TrainingJob.start(alice, make_expert("sized"), [words], params))
    version = ExpertVersion.objects.get(training_job=job)
    assert version.prefix_positions == prefix_positions_for(job.train_tokens) == 16


@pytest.mark.parametrize("objective", ["distill", "mix"])
def test_a_distillation_job_trains_and_publishes(alice, words, make_expert, eager, objective):
    params = {**WATCHED, "objective": objective, "teacher_context": 32, "evaluations": 0}
    job = run(TrainingJob.start(alice, make_expert(objective), [words], params))
    assert job.step == 20 and job.stopped == "done" and job.validation == []
    assert "not watched" in job.outcome


@pytest.mark.parametrize(
    "params, field, message",
    [
        ({"objective": "guess"}, "objective", "is not a valid choice"),
        ({"teacher_context": -1}, "teacher_context", "greater than or equal to 0"),
        ({"evaluations": 1000}, "evaluations", "less than or equal to 100"),
        # the tiny model's context is 256 tokens: a 200-token window and 128 before it
        ({"objective": "distill", "window": 200, "teacher_context": 128}, "window", "328 tokens"),
    ],
)
def test_objective_and_watch_parameters_are_bounded_in_the_api(
    alice_client, words, domain, params, field, message
):
    body = {"expert": "e", "datasets": ["words"], "domain": "python", "params": params}
    response = alice_client.post(JOBS, body, format="json")
    assert response.status_code == 400
    assert message in str(response.json()["params"][field])
    assert not TrainingJob.objects.exists()


def test_the_train_page_offers_the_objective_and_sizes_the_prefix_when_left_empty(
    alice, words, make_expert
):
    expert = make_expert("paged")
    client = logged_in(alice)
    url = f"/experts/alice/{expert.name}/train/"
    assert 'name="objective"' in client.get(url).content.decode()
    form = {
        "datasets": [words.pk],
        "time_budget_minutes": 1,
        "steps": 5,
        "n_latents": 0,
        "prefix_positions": "",
        "objective": "mix",
        "lora_rank": 2,
        "window": 64,
        "ahead_tokens": 4,
        "positions_per_window": 4,
        "lr": 0.001,
    }
    response = client.post(url, form)
    assert response.status_code == 302, response.content.decode()[-2000:]
    job = TrainingJob.objects.get(expert=expert)
    assert job.params["objective"] == "mix" and "prefix_positions" not in job.params
