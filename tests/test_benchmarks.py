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
    assert pyone.benchmark_gain == pytest.approx(own, abs=1e-3)
    assert pyone.off_domain_change == pytest.approx(-other, abs=1e-3)
    assert pyone.benchmarked_at is not None
    expert = pyone.expert
    expert.refresh_from_db()
    assert (expert.measured_gain, expert.gain_source) == (
        pytest.approx(own, abs=1e-3),
        Expert.BENCHMARK,
    )
    jobs = EvaluationJob.objects.filter(on_benchmarks=True)
    assert jobs.count() == 6 and {j.status for j in jobs} == {Job.SUCCEEDED}
    assert all("ppl_base_by_position" not in r for j in jobs for r in j.result["benchmarks"])


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
        assert logged_in(user).get(f"/api/v1/datasets/{benchmark.dataset.pk}/").status_code == 404
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
    gone = logged_in(sam).delete(f"/api/v1/datasets/{benchmark.dataset.pk}/")
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
