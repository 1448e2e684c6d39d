"""Domain benchmarks: staff hold out text per domain; the platform measures every ready
version on every benchmark with the same seeded pairs; the catalog, the expert page and the
leaderboards show those figures, and the text stays unreadable and untrainable."""

import pytest
from django.core.exceptions import ValidationError

from registry.models import Domain, Expert, ExpertVersion
from tests.factories import SMALL_JOB, logged_in, make_dataset, phrase_text
from training.models import Benchmark, BenchmarkResult, EvaluationJob, Job, TrainingJob

SMALL_BENCHMARK = {"window": 64, "ahead": 4, "max_windows": 6}
LEADERBOARD = "/api/v1/domains/python/leaderboard/"


@pytest.fixture
def shell(db):
    return Domain.objects.create(slug="shell", name="Shell")


@pytest.fixture
def add_benchmark(sam, base_model, django_capture_on_commit_callbacks):
    """Staff's benchmark for a domain, measured on every ready version (tasks run eagerly)."""

    def add(domain, name, seed=0):
        dataset = make_dataset(
            sam, name, phrase_text(length=1200, seed=seed), base_model=base_model
        )
        with django_capture_on_commit_callbacks(execute=True):
            return Benchmark.add(sam, domain, dataset, **SMALL_BENCHMARK)

    return add


@pytest.fixture
def published(make_expert, publish, shell, eager, django_capture_on_commit_callbacks):
    """Two public Python experts and a Shell one, each with a ready version."""
    made = {}
    for name, domain, seed in [("pyone", None, 1), ("pytwo", None, 2), ("sh", shell, 3)]:
        expert = make_expert(name, **({"domain": domain} if domain else {}))
        with django_capture_on_commit_callbacks(execute=True):
            made[name] = publish(expert, seed=seed)
    return made


def test_a_new_benchmark_measures_every_ready_version_on_the_same_pairs(
    published, add_benchmark, domain, shell, eager
):
    python_bench = add_benchmark(domain, "python-bench", seed=1)
    shell_bench = add_benchmark(shell, "shell-bench", seed=2)
    results = BenchmarkResult.objects.select_related("benchmark", "version")
    assert results.count() == 6  # 3 versions x 2 benchmarks
    for benchmark in (python_bench, shell_bench):
        mine = list(results.filter(benchmark=benchmark))
        # The same seeded pairs for all: the plain model's perplexity is one number.
        assert len({(r.pairs, round(r.ppl_base, 6)) for r in mine}) == 1
        assert mine[0].pairs == 6 * 4 and all(r.latency_ratio > 0 for r in mine)
    pyone = ExpertVersion.objects.get(pk=published["pyone"].pk)
    own = results.get(version=pyone, benchmark=python_bench).reduction_pct
    other = results.get(version=pyone, benchmark=shell_bench).reduction_pct
    assert pyone.benchmark_gain == round(own, 2)  # shown no finer than two decimals
    assert pyone.off_domain_change == round(-other, 2)
    assert pyone.benchmarked_at is not None
    expert = pyone.expert
    expert.refresh_from_db()
    assert (expert.measured_gain, expert.gain_source) == (round(own, 2), Expert.BENCHMARK)
    jobs = EvaluationJob.objects.filter(on_benchmarks=True)
    assert jobs.count() == 6 and {j.status for j in jobs} == {Job.SUCCEEDED}
    # What the owner sees of a measurement: its figures to two decimals, no curve, no ppl.
    shown = [r for j in jobs for r in j.result["benchmarks"]]
    figures = {"dataset", "window", "ahead", "pairs", "reduction_pct", "latency_ratio"}
    assert all(set(r) == figures for r in shown)
    assert all(r["reduction_pct"] == round(r["reduction_pct"], 2) for r in shown)


def test_a_new_version_is_measured_on_the_benchmarks_when_published(
    published,
    add_benchmark,
    domain,
    make_expert,
    publish,
    alice,
    django_capture_on_commit_callbacks,
):
    add_benchmark(domain, "python-bench")
    expert = published["pyone"].expert
    with django_capture_on_commit_callbacks(execute=True):
        version = publish(expert, seed=9)
    version.refresh_from_db()
    assert version.benchmark_gain is not None
    expert.refresh_from_db()
    assert expert.measured_gain == pytest.approx(version.benchmark_gain, abs=1e-3)
    # The platform's measurements never count against the owner's active jobs.
    assert Job.active_count(alice) == 0


def test_without_a_benchmark_the_owner_data_figure_is_labelled_as_such(
    published, alice, eager, django_capture_on_commit_callbacks
):
    version = published["pyone"]
    words = make_dataset(alice, base_model=version.expert.base_model)
    with django_capture_on_commit_callbacks(execute=True):
        EvaluationJob.start(alice, version, [words])
    expert = Expert.objects.get(pk=version.expert_id)
    assert expert.gain_source == Expert.OWNER_DATA and expert.measured_gain is not None
    page = logged_in(alice).get("/?sort=gain").content.decode()
    assert "(owner&#x27;s data)" in page or "(owner's data)" in page
    api = logged_in(alice).get("/api/v1/experts/alice/pyone/").json()
    assert api["gain_source"] == "owner-data"


def test_benchmark_text_is_never_listed_read_or_trained_on(
    published, add_benchmark, domain, alice, bob, sam, base_model
):
    benchmark = add_benchmark(domain, "python-bench")
    for user in (alice, bob):
        listed = logged_in(user).get("/api/v1/datasets/").json()["results"]
        assert "sam/python-bench" not in [d["id"] for d in listed]
        assert (
            logged_in(user).get(f"/api/v1/datasets/{benchmark.dataset.full_name}/").status_code
            == 404
        )
    refused = logged_in(alice).post(
        "/api/v1/jobs/evaluation/",
        {"expert": "alice/pyone", "datasets": ["sam/python-bench"]},
        content_type="application/json",
    )
    assert refused.status_code == 400 and "no such dataset" in str(refused.json())
    expert = published["pyone"].expert
    for user in (alice, sam):  # not even its owner trains on it
        with pytest.raises(ValidationError, match="never trained on"):
            TrainingJob.start(user, expert, [benchmark.dataset], SMALL_JOB)
    gone = logged_in(sam).delete(f"/api/v1/datasets/{benchmark.dataset.full_name}/")
    assert gone.status_code == 409 and "benchmark" in gone.json()["detail"]


def test_only_staff_private_datasets_can_become_benchmarks(alice, sam, domain, base_model):
    public = make_dataset(sam, "open", public=True, base_model=base_model)
    with pytest.raises(ValidationError, match="public dataset"):
        Benchmark.add(sam, domain, public)
    users = make_dataset(alice, "mine", base_model=base_model)
    with pytest.raises(ValidationError, match="belong to staff"):
        Benchmark.add(sam, domain, users)
    assert not Benchmark.objects.exists()


def test_the_leaderboard_ranks_newest_public_versions_with_their_figures(
    published,
    add_benchmark,
    domain,
    shell,
    anon_client,
    make_expert,
    publish,
    django_capture_on_commit_callbacks,
):
    add_benchmark(domain, "python-bench", seed=1)
    add_benchmark(shell, "shell-bench", seed=2)
    with django_capture_on_commit_callbacks(execute=True):
        publish(make_expert("hidden", visibility=Expert.PRIVATE), seed=4)
        publish(published["pytwo"].expert, seed=5)  # measured on publish: v2 takes v1's row
    body = anon_client.get(LEADERBOARD).json()
    assert body["domain"] == "python"
    assert [(b["name"], b["pairs"], b["window"], b["ahead"]) for b in body["benchmarks"]] == [
        ("python-bench", 24, 64, 4)
    ]
    rows = body["results"]
    assert sorted((r["expert"], r["version"]) for r in rows) == [
        ("alice/pyone", 1),
        ("alice/pytwo", 2),
    ]  # the newest version of each; no private expert, no other domain's
    gains = [r["benchmark_gain"] for r in rows]
    assert gains == sorted(gains, reverse=True)
    first = rows[0]
    version = ExpertVersion.objects.get(
        expert__name=first["expert"].split("/")[1], number=first["version"]
    )
    assert first["version"] == version.number and first["size"] == version.size
    assert first["off_domain_change"] == version.off_domain_change
    assert first["latency_ratio"] == version.latency_ratio
    assert first["downloads"] == 0 and first["benchmarked_at"]
    assert first["url"].endswith(f"/api/v1/experts/{first['expert']}/")
    assert anon_client.get("/api/v1/domains/nothing/leaderboard/").status_code == 404
    assert first["base_model"] == "tiny-llama" and body["base_model"] is None
    one_base = anon_client.get(LEADERBOARD, {"base_model": "tiny-llama"}).json()
    assert one_base["base_model"] == "tiny-llama" and one_base["results"] == rows
    assert anon_client.get(LEADERBOARD, {"base_model": "nothing"}).status_code == 404


def test_the_leaderboard_page_reads_without_javascript(published, add_benchmark, domain, client):
    add_benchmark(domain, "python-bench")
    html = client.get("/domains/python/leaderboard/").content.decode()
    assert "Python leaderboard" in html and "python-bench" in html
    assert 'href="/experts/alice/pyone/"' in html and 'href="/experts/alice/pytwo/"' in html
    assert "<script" not in html.split("<main", 1)[1]
    index = client.get("/leaderboards/").content.decode()
    assert 'href="/domains/python/leaderboard/"' in index
    expert_page = client.get("/experts/alice/pyone/").content.decode()
    assert "Python benchmark" in expert_page and "domain benchmark" in expert_page


def test_each_measurement_is_announced_to_the_owner(published, add_benchmark, domain, alice):
    from registry import events

    heard = []

    def listen(sender, user_id, event, payload, **kwargs):
        heard.append((user_id, event, payload))

    events.happened.connect(listen)
    try:
        add_benchmark(domain, "python-bench")
    finally:
        events.happened.disconnect(listen)
    measured = [p for u, e, p in heard if e == events.EVALUATION_RECORDED and u == alice.pk]
    assert {(p["expert"], p["source"]) for p in measured} == {
        ("alice/pyone", "benchmark"),
        ("alice/pytwo", "benchmark"),
        ("alice/sh", "benchmark"),
    }
    assert all(p["benchmark_gain"] is not None or p["expert"] == "alice/sh" for p in measured)
    succeeded = [p for u, e, p in heard if e == events.JOB_SUCCEEDED]
    assert len(succeeded) == 3 and {p["kind"] for p in succeeded} == {"evaluation"}


def test_the_leaderboard_table_is_built_once_per_cache_period(
    published, add_benchmark, domain, client, settings, django_assert_max_num_queries
):
    settings.LATENTRY_CATALOG_CACHE_SECONDS = 60
    add_benchmark(domain, "python-bench")

    def table(html):
        return html.decode().split('<div class="table-wrap">')[1]

    first = table(client.get("/domains/python/leaderboard/").content)
    with django_assert_max_num_queries(2):  # the session and the domain; the table is cached
        again = table(client.get("/domains/python/leaderboard/").content)
    assert again == first
    settings.LATENTRY_CATALOG_CACHE_SECONDS = 0
    ExpertVersion.objects.filter(pk=published["pyone"].pk).update(benchmark_gain=99.0)
    assert "+99.00%" in client.get("/domains/python/leaderboard/").content.decode()


def test_a_benchmark_is_never_offered_for_training_nor_trained_on_later(
    published, add_benchmark, domain, sam, alice, base_model, eager
):
    add_benchmark(domain, "python-bench")
    page = logged_in(sam)
    expert = published["pyone"].expert
    expert.owner = sam  # staff's own expert: staff may use every dataset but benchmarks
    expert.save()
    form = page.get(f"/experts/sam/{expert.name}/train/").content.decode()
    assert "python-bench" not in form
    refused = page.post(
        "/api/v1/jobs/training/",
        {"expert": "brand-new", "domain": "python", "datasets": ["sam/python-bench"]},
        content_type="application/json",
    )
    assert refused.status_code == 400 and "never trained on" in str(refused.json())
    assert not Expert.objects.filter(name="brand-new").exists()  # refused before it was made
    # A job queued before its dataset became a benchmark fails when a worker takes it.
    words = make_dataset(sam, "words", base_model=base_model)
    job = TrainingJob.objects.create(
        created_by=sam, expert=expert, base_model=base_model, params=SMALL_JOB
    )
    job.datasets.set([words])
    Benchmark.objects.create(domain=domain, dataset=words)
    from training import tasks

    tasks.train_expert.apply((job.pk,))
    job.refresh_from_db()
    assert job.status == Job.FAILED and "never trained on" in job.error


def test_only_the_newest_version_is_measured_and_figures_follow_the_domain(
    published, add_benchmark, domain, shell, publish, django_capture_on_commit_callbacks
):
    add_benchmark(domain, "python-bench")
    add_benchmark(shell, "shell-bench")
    pyone = ExpertVersion.objects.get(pk=published["pyone"].pk)
    own, off = pyone.benchmark_gain, pyone.off_domain_change
    # The expert moves to the shell domain: its own and off-domain benchmarks swap.
    expert = pyone.expert
    expert.domain = shell
    with django_capture_on_commit_callbacks(execute=True):
        expert.save()
    pyone.refresh_from_db()
    assert (pyone.benchmark_gain, pyone.off_domain_change) == (
        pytest.approx(-off, abs=1e-3),
        pytest.approx(-own, abs=1e-3),
    )
    # A benchmark removed: the figures that counted it are summarised without it.
    with django_capture_on_commit_callbacks(execute=True):
        Benchmark.objects.get(dataset__name="shell-bench").delete()
    pyone.refresh_from_db()
    assert pyone.benchmark_gain is None and pyone.off_domain_change is not None
    expert.refresh_from_db()
    assert expert.gain_source is None  # no benchmark figure and no owner-data one
    # An older version is never measured: only the newest one is ever shown.
    older = ExpertVersion.objects.get(pk=published["pytwo"].pk)
    BenchmarkResult.objects.filter(version=older).delete()
    newer = publish(older.expert, seed=7)  # its own measurement is not run here
    assert EvaluationJob.start_on_benchmarks(older, Benchmark.objects.all()) is None
    assert EvaluationJob.start_on_benchmarks(newer, Benchmark.objects.all()) is not None
    # ... and not twice: a queued measurement covers it.
    assert EvaluationJob.start_on_benchmarks(newer, Benchmark.objects.all()) is None


def overflowing(monkeypatch):
    """Evaluation as an expert whose values overflow the base model makes it: NaN figures."""
    from training import runner

    real = runner.evaluate

    def evaluate(decoder, expert, heldout, **kwargs):
        report = real(decoder, expert, heldout, **kwargs)
        report["augmented"]["ppl"] = report["reduction_pct"] = float("nan")
        return report

    monkeypatch.setattr(runner, "evaluate", evaluate)


def test_owners_cannot_cancel_the_platforms_measurements_and_a_cancelled_one_runs_again(
    published, add_benchmark, domain, alice, sam, publish, django_capture_on_commit_callbacks
):
    add_benchmark(domain, "python-bench")
    version = publish(published["pyone"].expert, seed=8)  # its measurement is not sent here
    job = EvaluationJob.start_on_benchmarks(version, Benchmark.objects.all())
    cancel = f"/api/v1/jobs/evaluation/{job.pk}/cancel/"
    refused = logged_in(alice).post(cancel)
    assert refused.status_code == 403 and "only staff may cancel" in refused.json()["detail"]
    job.refresh_from_db()
    assert job.status == Job.QUEUED and not job.cancel_requested
    with django_capture_on_commit_callbacks(execute=True):
        assert logged_in(sam).post(cancel).status_code == 200
    job.refresh_from_db()
    assert job.status == Job.CANCELLED
    version.refresh_from_db()  # tried again, and measured this time
    assert version.benchmark_gain is not None
    assert EvaluationJob.objects.filter(version=version, status=Job.SUCCEEDED).count() == 1


def test_a_measurement_that_keeps_failing_shows_not_measured_with_its_reason(
    published, add_benchmark, domain, alice, settings, monkeypatch, client
):
    settings.LATENTRY_BENCHMARK_RETRIES = 1
    pyone = published["pyone"]
    ExpertVersion.objects.filter(pk=pyone.pk).update(metrics={"reduction_pct": 12.5})
    pyone.expert.refresh_measured_gain()
    assert pyone.expert.gain_source == Expert.OWNER_DATA  # no benchmark in its domain yet
    overflowing(monkeypatch)
    add_benchmark(domain, "python-bench")
    tries = EvaluationJob.objects.filter(version=pyone, on_benchmarks=True)
    assert [j.status for j in tries] == [Job.FAILED, Job.FAILED]  # tried once more, no more
    for job in tries:
        assert "gave no finite figures" in job.error and "overflow" in job.error
        assert not any(sql in job.error for sql in ("INSERT", "constraint", "Error"))
    expert = Expert.objects.get(pk=pyone.expert_id)
    assert (expert.measured_gain, expert.gain_source) == (None, None)  # never the owner's
    page = client.get("/experts/alice/pyone/").content.decode()
    assert "Not measured: the platform&#x27;s measurement failed" in page
    assert "tried 2 time(s)." in page
    api = client.get("/api/v1/experts/alice/pyone/").json()
    assert api["measured_gain"] is None and api["gain_source"] is None


def test_an_owners_queued_measurements_are_capped_and_the_rest_wait_their_turn(
    published, sam, domain, settings, client, django_capture_on_commit_callbacks
):
    from training import tasks

    settings.LATENTRY_MAX_QUEUED_MEASUREMENTS = 1
    dataset = make_dataset(sam, "python-bench", phrase_text(length=1200), base_model=None)
    benchmark = Benchmark.add(sam, domain, dataset, **SMALL_BENCHMARK)  # its task is run below
    tasks.measure_on_benchmark(benchmark.pk)  # alice's three versions: one place for them
    queued = EvaluationJob.objects.get(on_benchmarks=True)
    assert queued.status == Job.QUEUED
    waiting = next(v for v in published.values() if v != queued.version)
    page = client.get(f"/experts/alice/{waiting.expert.name}/").content.decode()
    assert "Not measured yet: the measurement waits for a place in the queue." in page
    with django_capture_on_commit_callbacks(execute=True):
        queued.cancel_by(sam)  # its end makes room: each one then queues the next
    assert BenchmarkResult.objects.filter(benchmark=benchmark).count() == 3


def test_evaluation_reads_only_the_owners_or_public_data_and_never_a_benchmark_even_for_staff(
    add_benchmark, domain, sam, bob, make_expert, publish, admin_client
):
    benchmark = add_benchmark(domain, "python-bench")
    bobs = make_dataset(bob, "private-notes")
    bobs.domain = domain
    bobs.save()
    version = publish(make_expert("staff-made", owner=sam))
    for dataset, refusal in [
        (bobs, "may not read the dataset"),
        (benchmark.dataset, "measured by the platform alone"),
    ]:
        with pytest.raises(ValidationError, match=refusal):
            EvaluationJob.start(sam, version, [dataset])
    answer = admin_client.post(
        "/admin/registry/expertversion/",
        {"action": "evaluate", "_selected_action": [version.pk]},
        follow=True,
    )
    assert "no dataset to evaluate on" in answer.content.decode()
    assert not EvaluationJob.objects.filter(on_benchmarks=False).exists()


def test_an_evaluation_that_overflows_fails_with_a_clear_reason(
    published, alice, monkeypatch, django_capture_on_commit_callbacks
):
    overflowing(monkeypatch)
    words = make_dataset(alice, base_model=published["pyone"].expert.base_model)
    with django_capture_on_commit_callbacks(execute=True):
        job = EvaluationJob.start(alice, published["pyone"], [words])
    job.refresh_from_db()
    assert job.status == Job.FAILED
    assert job.error.startswith("measuring on alice/words gave no finite figures")
    assert "INSERT" not in job.error and "internal error" not in job.error
