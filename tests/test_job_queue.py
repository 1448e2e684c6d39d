"""A job says where it stands: its place in the fair queue and why while it waits, and its step
count as an estimate while a time budget rules it, alike in the API, the pages and the admin."""

from django.utils import timezone

from tests.factories import SMALL_JOB, logged_in, make_dataset
from training.models import Job, TrainingJob

JOBS = "/api/v1/jobs/training/"


def test_a_queued_job_shows_its_place_in_the_fair_queue_and_why(
    alice, bob, alice_client, admin_client, base_model, make_expert
):
    words = make_dataset(alice, base_model=base_model)
    first, second = (
        TrainingJob.start(alice, make_expert(f"a{n}"), [words], SMALL_JOB) for n in range(2)
    )
    theirs = TrainingJob.start(
        bob, make_expert("b0", owner=bob), [make_dataset(bob, "words")], SMALL_JOB
    )
    TrainingJob.objects.filter(pk=first.pk).update(status=Job.RUNNING, started_at=timezone.now())
    # bob's job goes before alice's second: alice just had a turn
    assert theirs.queue_position()["place"] == 1
    shown = alice_client.get(f"{JOBS}{second.pk}/").json()["queue"]
    assert shown == {
        "place": 2,
        "ahead": 1,
        "running": 1,
        "reason": "queued, 1 job ahead (1 running); turns alternate between users",
    }
    assert alice_client.get(f"{JOBS}{first.pk}/").json()["queue"] is None  # it runs
    page = logged_in(alice).get(f"/jobs/{second.pk}/").content.decode()
    assert "Queued, 1 job ahead (1 running); turns alternate between users." in page
    admin = admin_client.get("/admin/training/trainingjob/").content.decode()
    assert "queued, 1 job ahead (1 running)" in admin


def test_a_budget_bound_job_shows_its_step_count_as_an_estimate(
    alice, alice_client, base_model, make_expert
):
    job = TrainingJob.start(alice, make_expert("e"), [make_dataset(alice)], SMALL_JOB)
    assert job.steps_summary() == "step 0"  # not known yet: no "of ?"
    TrainingJob.objects.filter(pk=job.pk).update(
        status=Job.RUNNING, step=12, total_steps=170, steps_estimated=True
    )
    job.refresh_from_db()
    assert job.steps_summary() == "step 12 of about 170"
    detail = alice_client.get(f"{JOBS}{job.pk}/").json()
    assert (detail["total_steps"], detail["steps_estimated"]) == (170, True)
    assert "step 12 of about 170" in logged_in(alice).get(f"/jobs/{job.pk}/").content.decode()
    assert "step 12 of about 170" in logged_in(alice).get("/jobs/").content.decode()
    TrainingJob.objects.filter(pk=job.pk).update(steps_estimated=False, total_steps=200)
    job.refresh_from_db()
    assert job.steps_summary() == "step 12 of 200"
