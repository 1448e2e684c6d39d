"""The pages in a real browser: Debian's Chromium, headless, driven by Playwright against a live
server and a real job worker. Screenshots of the main pages go to var/screenshots/."""

import os
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from playwright.sync_api import expect, sync_playwright

from registry.models import ApiKey, Expert, ExpertVersion
from tests.factories import Worker, new_queue, phrase_text, worker_env
from training.models import TrainingJob

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(django_settings.VAR_DIR) / "screenshots"
pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test does)")
    # Playwright's sync API runs an event loop in this thread; the ORM calls of the test body
    # are still plain synchronous code.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()
    os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


@pytest.fixture
def page(browser, live_server):
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def shoot(page, name):
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_a_visitor_searches_filters_and_opens_an_expert(page, make_expert, publish, domain):
    from registry.models import Domain

    licences = Domain.objects.create(slug="licences", name="Licences")
    pydoc = make_expert(
        "pydoc",
        summary="Python's documentation, in the cache",
        model_card="## What it knows\n\nThe **standard library**.",
        download_count=120,
    )
    publish(pydoc)  # a new newest version has no figure until the platform measures it
    Expert.objects.filter(pk=pydoc.pk).update(measured_gain=6.56, gain_source=Expert.BENCHMARK)
    make_expert("pytest-guru", summary="pytest fixtures and plugins", download_count=30)
    make_expert("gpl", summary="Software licences", domain=licences, measured_gain=2.1)
    make_expert("secret-python", visibility=Expert.PRIVATE, summary="Python, private")

    page.goto("/")
    cards = page.locator(".card")
    assert cards.count() == 3
    shoot(page, "catalog")
    page.get_by_placeholder("Search experts").press_sequentially("py")
    page.wait_for_url("**/?q=py*")  # htmx swapped the results and pushed the address
    assert page.locator(".card h2").all_inner_texts() == ["alice/pydoc", "alice/pytest-guru"]
    page.get_by_label("Domain").select_option("licences")
    page.wait_for_function("document.querySelectorAll('.card').length === 0")
    page.get_by_placeholder("Search experts").fill("")
    page.wait_for_function("document.querySelectorAll('.card').length === 1")
    assert page.locator(".card h2").inner_text() == "alice/gpl"
    page.get_by_label("Domain").select_option("")
    page.get_by_label("Sort").select_option("gain")
    page.wait_for_url("**sort=gain*")
    # by downloads it would be pydoc, pytest-guru, gpl; unmeasured experts come last
    expect(page.locator(".card h2")).to_have_text(["alice/pydoc", "alice/gpl", "alice/pytest-guru"])
    page.get_by_role("link", name="alice/pydoc").click()
    page.wait_for_url("**/experts/alice/pydoc/")
    assert page.get_by_role("heading", name="What it knows").is_visible()
    assert "+6.56%" in page.locator(".expert-head").inner_text()
    assert page.get_by_role("link", name="Download v1").is_visible()
    shoot(page, "expert")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    shoot(page, "expert-phone")


def test_the_catalog_works_by_keyboard_and_without_javascript(browser, live_server, make_expert):
    make_expert("pydoc", summary="Python docs")
    make_expert("gpl", summary="Licences")
    context = browser.new_context(base_url=live_server.url, java_script_enabled=False)
    page = context.new_page()
    page.goto("/?q=python")
    assert page.locator(".card h2").all_inner_texts() == ["alice/pydoc"]
    page.get_by_role("link", name="alice/pydoc").click()
    page.wait_for_url("**/experts/alice/pydoc/")
    assert page.get_by_role("heading", name="alice/pydoc", level=1).is_visible()
    context.close()

    context = browser.new_context(base_url=live_server.url)
    page = context.new_page()
    page.goto("/")
    page.keyboard.press("Tab")  # the skip link first
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    for _ in range(20):  # on to the first expert card, and open it with Enter
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.closest('.card') !== null"):
            break
    page.keyboard.press("Enter")
    page.wait_for_url("**/experts/alice/*/")
    context.close()


def test_a_model_card_with_scripts_and_javascript_links_renders_inert(page, make_expert):
    make_expert(
        "evil",
        model_card=(
            "<script>window.pwned = 1</script>\n\n[click me](javascript:window.pwned=2)\n\n"
            '<a href="javascript:window.pwned=3" onclick="window.pwned=4">also</a> '
            '<img src="x" onerror="window.pwned=5">'
        ),
    )
    page.goto("/experts/alice/evil/")
    card = page.locator(".model-card")
    assert card.locator("script").count() == 0
    for link in card.locator("a").all():
        assert not (link.get_attribute("href") or "").startswith("javascript:")
        assert link.get_attribute("onclick") is None
        link.click()
    assert page.evaluate("window.pwned") is None


@pytest.fixture
def worker(settings, tmp_path):
    settings.LATENTRY_JOB_QUEUE = new_queue()
    artifacts = Path(settings.STORAGES["artifacts"]["OPTIONS"]["location"])
    env = worker_env(settings.LATENTRY_JOB_QUEUE, artifacts)
    started = Worker(settings.LATENTRY_JOB_QUEUE, env, log_path=tmp_path / "worker.log")
    yield started
    started.stop()


def test_a_user_publishes_tries_trains_and_manages_keys(
    page, base_model, domain, expert_file, worker, tmp_path
):
    # Sign up.
    page.goto("/")
    page.get_by_role("link", name="Sign up").click()
    page.get_by_label("Username").fill("dora")
    page.locator("#id_password1").fill("a-long-pass-42")
    page.locator("#id_password2").fill("a-long-pass-42")
    page.get_by_role("button", name="Create account").click()

    # Create an expert.
    page.wait_for_url("**/experts/new/")
    page.get_by_label("Name").fill("words")
    page.get_by_label("Title").fill("Phrases of w-words")
    page.get_by_label("Domain").select_option(label="Python")
    page.get_by_label("Model card").fill("# Words\n\nTrained on phrases.")
    shoot(page, "expert-new")
    page.get_by_role("button", name="Create expert").click()

    # Upload an invalid file: the error shows next to the field, nothing is stored.
    page.wait_for_url("**/experts/dora/words/upload/")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    page.locator("input[type=file]").set_input_files(str(bad))
    page.get_by_role("button", name="Upload").click()
    error = page.locator("#file-error")
    error.wait_for()
    assert "safetensors" in error.inner_text()
    assert not ExpertVersion.objects.exists()
    shoot(page, "upload-error")

    # Drop a valid one on the field: the expert's page, with version 1.
    page.evaluate(
        """(bytes) => {
            const data = new DataTransfer();
            data.items.add(new File([new Uint8Array(bytes)], "good.safetensors"));
            const zone = document.querySelector("[data-dropzone]");
            zone.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
        }""",
        list(expert_file()),
    )
    assert page.locator("[data-chosen]").inner_text() == "good.safetensors"
    page.get_by_role("button", name="Upload").click()
    page.wait_for_url("**/experts/dora/words/")
    assert page.get_by_text("Version 1 is ready.").is_visible()

    # Try it: an error shows under the form; then the plain model beside the expert.
    page.get_by_label("Prompt").fill("w5 " * 300)
    page.get_by_label("New tokens").fill("6")
    page.get_by_role("button", name="Compare with the plain model").click()
    expect(page.locator("#try-result [role=alert]")).to_contain_text("does not fit the context")
    page.get_by_label("Prompt").fill("w5 w6 w7")
    page.get_by_label("Compose with (optional)").fill("dora/missing")  # a part not there
    page.get_by_role("button", name="Compare with the plain model").click()
    expect(page.locator("#try-result [role=alert]")).to_contain_text("dora/missing")
    page.get_by_label("Compose with (optional)").fill("")
    page.get_by_label("New tokens").fill("6")
    page.get_by_role("button", name="Compare with the plain model").click()
    page.locator(".answer").nth(1).wait_for()
    assert page.locator(".answer.augmented").count() == 1, page.locator("#try-result").inner_text()
    assert "With dora/words@1" in page.locator(".answer.augmented h3").inner_text()
    assert "decode" in page.locator(".answer.augmented .timings").inner_text()
    shoot(page, "try-it")

    # Upload a dataset and train.
    page.get_by_role("link", name="Datasets").click()
    text = tmp_path / "phrases.txt"
    text.write_text(phrase_text(length=3000))
    page.get_by_label("Name").fill("phrases")
    page.locator("input[type=file]").set_input_files(str(text))
    page.get_by_role("button", name="Upload dataset").click()
    expect(page.get_by_text("Dataset dora/phrases is ready")).to_be_visible()
    page.goto("/experts/dora/words/train/")
    page.get_by_label("dora/phrases").check()
    page.get_by_label("Time budget minutes").fill("2")
    page.get_by_text("Advanced settings").click()
    small = {"Steps": 60, "N latents": 2, "Lora rank": 2, "Window": 64, "Ahead tokens": 4}
    for label, value in {**small, "Positions per window": 4}.items():
        page.get_by_label(label, exact=True).fill(str(value))
    page.get_by_role("button", name="Start training").click()
    page.wait_for_url("**/jobs/*/")
    job = TrainingJob.objects.get()
    page.wait_for_function(
        "() => document.querySelector('progress').value > 0", timeout=60_000
    )  # live progress, swapped in by htmx while the worker writes it
    shoot(page, "job-running")
    page.locator('[data-status="succeeded"]').wait_for(timeout=120_000)
    page.locator("table.evaluation").wait_for(timeout=120_000)  # the evaluation it queued
    job.refresh_from_db()
    assert job.status == TrainingJob.SUCCEEDED and page.locator("svg.chart polyline").count()
    shoot(page, "job-done")

    # An API key: shown once, then revoked.
    page.get_by_role("link", name="dora", exact=True).click()
    page.get_by_label("Name").fill("laptop")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-key").inner_text()
    assert ApiKey.objects.get(name="laptop").matches(secret)
    shoot(page, "account")
    page.get_by_role("button", name="Revoke laptop").click()
    expect(page.locator("table").first).to_contain_text("revoked")
    assert ApiKey.objects.get(name="laptop").revoked_at is not None
    assert secret not in page.content()


def test_a_leaderboard_reads_without_javascript_and_on_a_phone(
    browser, live_server, make_expert, publish, domain, sam, base_model
):
    from config.celery import app
    from tests.factories import make_dataset
    from training.models import Benchmark

    app.conf.task_always_eager = True  # the measurements run here, as the benchmark is added
    try:
        for name, seed in [("pydoc", 1), ("stdlib", 2), ("typing-tips", 3)]:
            publish(make_expert(name, summary=f"{name} in the cache"), seed=seed)
        bench = make_dataset(sam, "python-bench", phrase_text(length=1200), base_model=base_model)
        Benchmark.add(sam, domain, bench, window=64, ahead=4, max_windows=6)
    finally:
        app.conf.task_always_eager = False
    context = browser.new_context(
        base_url=live_server.url, java_script_enabled=False, viewport={"width": 390, "height": 844}
    )
    page = context.new_page()
    page.goto("/leaderboards/")
    page.get_by_role("link", name="Python").click()
    page.wait_for_url("**/domains/python/leaderboard/")
    rows = page.locator("table.leaderboard tbody tr")
    assert rows.count() == 3
    assert rows.first.locator("td").first.inner_text() == "1"
    assert "python-bench" in page.locator("dl[aria-label=benchmarks]").inner_text()
    # The page fits a phone: only the table scrolls sideways, inside its own box.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shoot(page, "leaderboard-phone")
    first = rows.first.locator("a").inner_text()
    rows.first.locator("a").click()
    page.wait_for_url(f"**/experts/{first}/")
    assert page.get_by_text("Python benchmark").is_visible()
    context.close()


def test_the_owner_moves_an_alias_on_the_expert_page(page, make_expert, publish, alice):
    expert = make_expert("pydoc")
    publish(expert, seed=1)
    publish(expert, seed=2)
    page.goto("/accounts/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("alice-pass-1")
    page.get_by_role("button", name="Log in").click()
    page.goto("/experts/alice/pydoc/")
    form = page.locator("#aliases form")
    form.get_by_label("Alias").fill("stable")
    form.get_by_label("Points to").select_option("1")
    form.get_by_role("button", name="Move alias").click()
    page.wait_for_url("**/experts/alice/pydoc/#aliases")
    form = page.locator("#aliases form")
    form.get_by_label("Alias").fill("stable")
    form.get_by_label("Points to").select_option("2")
    form.get_by_role("button", name="Move alias").click()
    page.wait_for_url("**/experts/alice/pydoc/#aliases")
    expect(page.locator("p.message[role=status]").first).to_contain_text("now points to v2")
    history = page.get_by_role("table", name="alias history").locator("tbody tr")
    assert history.all_inner_texts()[0].split("\t")[1:] == ["stable", "v1", "v2", "alice"]
    assert expert.aliases.get(name="stable").version.number == 2
    page.locator("#aliases").screenshot(path=str(SHOTS / "aliases.png"))


def test_trying_an_expert_on_the_real_model_shows_both_answers(
    page, settings, domain, alice, tmp_path
):
    """SmolLM2 given the README's question as raw text ended its answer at once: the plain
    side showed nothing. The page sends a chat message by default."""
    import hashlib
    import io

    from django.core.management import call_command

    from coprocessor import base_models
    from coprocessor.expert import Coprocessor, CoprocessorConfig
    from registry.models import BaseModel

    call_command("import_base_model", stdout=io.StringIO())  # converted once, under var/
    base = BaseModel.objects.get(slug=base_models.DEFAULT_SLUG)
    model, _ = base_models.load(base.weights_location)
    config = CoprocessorConfig(n_latents=0, prefix_positions=16, prefix_gate_init=-4.0)
    path = tmp_path / "prefix.safetensors"
    Coprocessor(model, config).save(path, base.fingerprint, base.slug)
    expert = Expert.objects.create(owner=alice, name="zip", domain=domain, base_model=base)
    data = path.read_bytes()
    ExpertVersion.publish(
        expert, io.BytesIO(data), sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    settings.LATENTRY_ANONYMOUS_GENERATION = True  # as make run has it
    page.goto("/experts/alice/zip/")
    page.get_by_label("Prompt").fill("What does zip() do?")
    page.get_by_label("New tokens").fill("12")
    page.get_by_role("button", name="Compare with the plain model").click()
    answers = page.locator("#try-result .answer pre.output")
    expect(answers).to_have_count(2, timeout=120_000)
    plain, augmented = answers.all_inner_texts()
    assert plain.strip() and augmented.strip()
    shoot(page, "try-real-model")


def test_an_expert_page_shows_its_measured_pairings(page, make_expert, publish, sam, domain):
    from django.utils import timezone

    from tests.factories import make_dataset
    from training.models import Benchmark, BenchmarkResult, EvaluationJob, Job

    python = publish(make_expert("python"), seed=1, n_latents=0, prefix_positions=4)
    unix = publish(make_expert("unix"), seed=2, n_latents=0, prefix_positions=4)
    dataset = make_dataset(sam, "python-bench", phrase_text(length=1200))
    benchmark = Benchmark.objects.create(domain=domain, dataset=dataset, added_by=sam)
    figures = dict(pairs=24, ppl_base=16.0, ppl_expert=15.4, latency_ratio=1.0)
    BenchmarkResult.objects.create(
        version=python, benchmark=benchmark, reduction_pct=3.72, **figures
    )
    measured = {"benchmark": benchmark.pk, "domain": "python", "pairs": 24, "latency_ratio": 1.02}
    EvaluationJob.objects.create(
        created_by=python.expert.owner,
        version=python,
        partner=unix,
        on_benchmarks=True,
        status=Job.SUCCEEDED,
        finished_at=timezone.now(),
        result={"pairing": [{**measured, "reduction_pct": 4.18}]},
    )
    page.goto("/experts/alice/python/")
    table = page.get_by_role("table", name="measured pairings")
    expect(table).to_be_visible()
    cells = table.locator("tbody td").all_inner_texts()
    assert cells == [
        "alice/python@1+alice/unix@1",
        "python (alice/python@1)",
        "+4.18%",
        "+3.72%",
        "1.12",
    ]
    shoot(page, "expert-pairings")
