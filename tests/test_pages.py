"""The pages, through Django's test client: they work without JavaScript, keep private experts
private, show errors next to fields, and render model cards inert."""

import io
import re

import pytest
from django.contrib.auth.models import User
from django.test import Client
from rest_framework import serializers

from inference import pool, service
from inference.pages import compare
from registry.charts import line_chart
from registry.models import ApiKey, Expert, ExpertVersion, Review
from registry.templatetags.latentry import markdown
from tests.factories import logged_in, make_dataset
from training.models import Dataset, TrainingJob

pytestmark = pytest.mark.django_db


def listed(response):
    """The experts named by the cards of a catalog response, in order."""
    return re.findall(r'/experts/\w+/([\w.-]+)/"><?', response.content.decode())


def test_the_catalog_searches_filters_sorts_and_pages(make_expert, base_model, alice):
    make_expert("pydoc", summary="Python documentation", download_count=5)
    make_expert("licences", summary="Software licences", download_count=50)
    make_expert("hidden", visibility=Expert.PRIVATE, summary="Python secrets")
    for i in range(13):
        make_expert(f"filler-{i}", measured_gain=float(i))
    anonymous = Client()

    assert listed(anonymous.get("/", {"q": "python"})) == ["pydoc"]
    assert listed(anonymous.get("/", {"sort": "downloads"}))[:2] == ["licences", "pydoc"]
    by_gain = anonymous.get("/", {"sort": "gain"})
    assert listed(by_gain)[:2] == ["filler-12", "filler-11"] and "+12.00%" in by_gain.text

    first = anonymous.get("/")
    assert "15 experts" in first.text and len(listed(first)) == 12
    second = anonymous.get("/", {"page": 2})
    assert "Page 2 of 2" in second.text and len(listed(second)) == 3
    assert listed(anonymous.get("/", {"domain": "nope"})) == []
    assert listed(anonymous.get("/", {"domain": "python", "q": "licences"})) == ["licences"]
    assert sorted(listed(logged_in(alice).get("/", {"q": "python"}))) == ["hidden", "pydoc"]


def test_htmx_gets_only_the_results(make_expert):
    make_expert("pydoc")
    response = Client().get("/", {"q": "pydoc"}, HTTP_HX_REQUEST="true")
    assert listed(response) == ["pydoc"] and "<html" not in response.text


def test_an_htmx_history_restore_gets_the_whole_page(make_expert):
    make_expert("pydoc")
    response = Client().get(
        "/", {"q": "pydoc"}, HTTP_HX_REQUEST="true", HTTP_HX_HISTORY_RESTORE_REQUEST="true"
    )
    assert "<html" in response.text and "HX-Request" in response["Vary"]


def test_the_kind_filter_reads_ready_versions(make_expert, publish):
    publish(make_expert("trained"))
    make_expert("empty")
    assert listed(Client().get("/", {"kind": "lora"})) == ["trained"]
    assert listed(Client().get("/", {"kind": "full"})) == []
    publish(make_expert("rejected")).reject("stored bytes do not match")
    assert listed(Client().get("/", {"kind": "lora"})) == ["trained"]


def test_the_pages_filter_by_the_api_s_fields(make_expert, bob):
    make_expert("pydoc")
    make_expert("other", owner=bob)
    assert listed(Client().get("/", {"owner": "bob"})) == ["other"]
    api = Client().get("/api/v1/experts/", {"owner": "bob"}).json()
    assert [e["id"] for e in api["results"]] == ["bob/other"]


def test_rejected_versions_show_their_reason_and_no_download(make_expert, publish, bob):
    expert = make_expert("pydoc")
    publish(expert)
    publish(expert, seed=1).reject("stored bytes of version 2 do not match its sha256")
    page = logged_in(bob).get("/experts/alice/pydoc/").text
    assert "rejected: stored bytes of version 2 do not match its sha256" in page
    assert "/versions/1/download/" in page and "/versions/2/download/" not in page


def test_a_private_expert_is_404_to_others_and_shown_to_its_owner(make_expert, alice, bob):
    make_expert("secret", visibility=Expert.PRIVATE)
    for client in (Client(), logged_in(bob)):
        assert client.get("/experts/alice/secret/").status_code == 404
        assert client.post("/experts/alice/secret/try/", {"prompt": "x"}).status_code == 404
    assert logged_in(alice).get("/experts/alice/secret/").status_code == 200
    assert listed(Client().get("/publishers/alice/")) == []
    assert listed(logged_in(alice).get("/publishers/alice/")) == ["secret"]


def test_model_cards_render_inert():
    html = str(
        markdown(
            "# Card\n\n<script>alert(1)</script>\n\n[click](javascript:alert(2)) "
            '<a href="javascript:alert(3)" onclick="alert(4)">x</a> '
            '<img src=x onerror="alert(5)"> [ok](https://example.org)'
        )
    )
    assert "<script" not in html and "javascript:" not in html
    assert "onclick" not in html and "onerror" not in html
    assert '<a href="https://example.org" rel="nofollow noopener noreferrer">ok</a>' in html
    assert "<h1>Card</h1>" in html


def test_the_expert_page_shows_versions_chart_and_reviews(make_expert, publish, bob):
    expert = make_expert("pydoc", model_card="**Bold** card")
    version = publish(expert)
    version.metrics = {
        "evaluations": [
            {
                "dataset": "alice/words",
                "split": "heldout",
                "pairs": 8,
                "ppl_base": 10.0,
                "ppl_expert": 9.0,
                "reduction_pct": 10.0,
                "ppl_base_by_position": [11.0, 10.0, 9.0],
                "ppl_expert_by_position": [10.0, 9.0, 8.0],
            }
        ]
    }
    version.save()
    Review.objects.create(user=bob, expert=expert, stars=4, text="Useful")
    expert.update_rating()
    page = Client().get("/experts/alice/pydoc/").content.decode()
    assert "<strong>Bold</strong>" in page
    assert version.sha256[:10] in page and "v1" in page
    assert "<svg" in page and "with expert" in page
    assert "Useful" in page and "★★★★☆" in page
    assert "/api/v1/experts/alice/pydoc/versions/1/download/" in page


def test_reviews_are_one_per_user_and_not_by_the_owner(make_expert, alice, bob):
    expert = make_expert("pydoc")
    bob_client = logged_in(bob)
    bob_client.post("/experts/alice/pydoc/review/", {"stars": 5, "text": "great"})
    bob_client.post("/experts/alice/pydoc/review/", {"stars": 3, "text": "ok"})
    assert list(expert.reviews.values_list("stars", "text")) == [(3, "ok")]
    expert.refresh_from_db()
    assert expert.rating == 3.0
    own = logged_in(alice).post("/experts/alice/pydoc/review/", {"stars": 5})
    assert own.status_code == 403 and "cannot review your own expert" in own.text
    bad = bob_client.post("/experts/alice/pydoc/review/", {"stars": 9})
    assert bad.status_code == 400 and "Select a valid choice" in bad.content.decode()


def test_sign_up_and_log_in_attempts_are_limited_per_address(settings, alice):
    rates = {"login": "2/min", "signup": "1/hour"}
    settings.LATENTRY_THROTTLE_RATES = {**settings.LATENTRY_THROTTLE_RATES, **rates}
    client = Client()
    wrong = {"username": "alice", "password": "guess"}
    answers = [client.post("/accounts/login/", wrong).status_code for _ in range(2)]
    right = client.post("/accounts/login/", {"username": "alice", "password": "alice-pass-1"})
    assert answers == [200, 200] and right.status_code == 429
    assert "the limit is 2/min" in right.content.decode() and int(right["Retry-After"]) >= 1
    assert "_auth_user_id" not in client.session
    assert client.get("/accounts/login/").status_code == 200  # the form still shows
    new = {"username": "dora", "password1": "a-long-pass-42", "password2": "a-long-pass-42"}
    assert client.post("/accounts/signup/", new).status_code == 302
    again = client.post("/accounts/signup/", {**new, "username": "eve"})
    assert again.status_code == 429 and "the limit is 1/hour" in again.content.decode()
    assert not Expert.objects.exists() and not User.objects.filter(username="eve").exists()


def test_signing_up_creating_an_expert_and_editing_its_card(base_model, domain):
    client = Client()
    response = client.post(
        "/accounts/signup/",
        {"username": "dora", "password1": "a-long-pass-42", "password2": "a-long-pass-42"},
    )
    assert response.status_code == 302
    response = client.post(
        "/experts/new/",
        {
            "name": "pydoc",
            "title": "Python docs",
            "domain": domain.pk,
            "base_model": base_model.pk,
            "visibility": "private",
            "license": "mit",
            "tags": "python, docs",
        },
    )
    assert response.status_code == 302 and response["Location"].endswith("/upload/")
    expert = Expert.objects.get(owner__username="dora", name="pydoc")
    assert expert.tags == ["python", "docs"] and expert.visibility == Expert.PRIVATE
    again = client.post("/experts/new/", {"name": "pydoc", "domain": domain.pk})
    assert "you already have an expert named" in again.content.decode()
    bad_tags = client.post(
        "/experts/dora/pydoc/edit/", {"domain": domain.pk, "tags": "Bad Tag", "license": "mit"}
    )
    assert "tags are 1-40 lowercase" in bad_tags.content.decode()
    client.post(
        "/experts/dora/pydoc/edit/",
        {"domain": domain.pk, "visibility": "public", "license": "mit", "model_card": "# Hi"},
    )
    expert.refresh_from_db()
    assert expert.visibility == Expert.PUBLIC and expert.model_card == "# Hi"


def test_only_the_owner_edits_uploads_or_trains(make_expert, bob):
    make_expert("pydoc")
    client = logged_in(bob)
    for path in ("edit/", "upload/", "train/"):
        assert client.get(f"/experts/alice/pydoc/{path}").status_code == 404
    assert Client().get("/experts/alice/pydoc/edit/").status_code == 302  # to the login


def test_uploading_a_version_shows_errors_next_to_the_file_and_changes_nothing(
    make_expert, alice, expert_file
):
    expert = make_expert("pydoc")
    client = logged_in(alice)
    bad = client.post(
        "/experts/alice/pydoc/upload/",
        {"file": io.BytesIO(b"not a safetensors file"), "changelog": ""},
    )
    assert bad.status_code == 400
    assert re.search(r'class="error" role="alert" id="file-error">[^<]*safetensors', bad.text)
    assert not expert.versions.exists()
    good = client.post("/experts/alice/pydoc/upload/", {"file": io.BytesIO(expert_file())})
    assert good.status_code == 302
    assert expert.versions.get().status == ExpertVersion.READY


def test_api_keys_are_shown_once_and_revoked_only_by_their_owner(alice, bob):
    client = logged_in(alice)
    created = client.post("/account/", {"name": "laptop", "scopes": ["read"]})
    plaintext = re.search(r'<code id="new-key">([^<]+)</code>', created.text).group(1)
    key = ApiKey.objects.get(user=alice)
    assert key.matches(plaintext) and key.scopes == ["read"]
    assert created["Cache-Control"] == "no-store"
    assert plaintext not in client.get("/account/").text
    client.post(f"/account/keys/{key.prefix}/revoke/")
    key.refresh_from_db()
    assert key.revoked_at is not None
    other, _ = ApiKey.create_for(alice, "other")
    assert logged_in(bob).post(f"/account/keys/{other.prefix}/revoke/").status_code == 404
    other.refresh_from_db()
    assert other.revoked_at is None


def test_trying_an_expert_compares_it_with_the_plain_model(settings, make_expert, publish):
    settings.LATENTRY_ANONYMOUS_GENERATION = True  # as make run has it (test_anonymous.py)
    publish(make_expert("pydoc"))
    response = Client().post(
        "/experts/alice/pydoc/try/",
        {"prompt": "def main():", "max_new_tokens": 4},
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 200
    assert "Plain base model" in response.text and "With alice/pydoc@1" in response.text
    assert 'data-augmented="true"' in response.text and "decode" in response.text
    too_long = Client().post(
        "/experts/alice/pydoc/try/", {"prompt": "word " * 3000, "max_new_tokens": 4}
    )
    assert too_long.status_code == 400


def test_trying_decodes_both_answers_in_one_batch_equal_to_each_alone(make_expert, publish):
    expert = make_expert("pydoc")
    publish(expert)
    plain, augmented = compare(expert, None, prompt="w5 w6 w7", max_new_tokens=6)
    engine = pool.pool().bases[expert.base_model.slug].engine
    assert engine.admitted_sizes[-1] == 2
    assert augmented.augmented and not plain.augmented
    base = expert.base_model.slug
    alone = [
        service.run(service.Ask(base=base, prompt="w5 w6 w7", max_new_tokens=6), None),
        service.run(
            service.Ask(base=base, expert="alice/pydoc", prompt="w5 w6 w7", max_new_tokens=6),
            None,
        ),
    ]
    assert list(engine.admitted_sizes)[-2:] == [1, 1]
    assert [a.token_ids for a in alone] == [plain.token_ids, augmented.token_ids]


def test_training_from_the_pages_starts_a_job_the_owner_can_watch_and_cancel(
    make_expert, alice, bob, base_model, settings
):
    settings.CELERY_TASK_ALWAYS_EAGER = False
    make_expert("pydoc")
    client = logged_in(alice)
    upload = client.post(
        "/datasets/", {"name": "notes", "file": io.BytesIO(b"\xff\xfe bad"), "public": ""}
    )
    assert upload.status_code == 400 and "UTF-8" in upload.text
    words = make_dataset(alice)
    bad = client.post(
        "/experts/alice/pydoc/train/",
        {"datasets": [words.pk], "time_budget_minutes": 1, "steps": 5, "n_latents": 999,
         "lora_rank": 2, "window": 64, "ahead_tokens": 4, "positions_per_window": 4, "lr": 0.01,
         "prefix_positions": 4},
    )  # fmt: skip
    assert bad.status_code == 400 and not TrainingJob.objects.exists()
    assert "Ensure this value is less than or equal to 64" in bad.text
    started = client.post(
        "/experts/alice/pydoc/train/",
        {"datasets": [words.pk], "time_budget_minutes": 1, "steps": 5, "n_latents": 2,
         "lora_rank": 2, "window": 64, "ahead_tokens": 4, "positions_per_window": 4, "lr": 0.01,
         "prefix_positions": 4},
    )  # fmt: skip
    job = TrainingJob.objects.get()
    assert started["Location"] == f"/jobs/{job.pk}/"
    assert job.params["time_budget_s"] == 60 and job.params["n_latents"] == 2
    page = client.get(f"/jobs/{job.pk}/")
    assert 'hx-trigger="every 2s"' in page.text and "queued" in page.text
    assert logged_in(bob).get(f"/jobs/{job.pk}/").status_code == 404
    client.post(f"/jobs/{job.pk}/cancel/")
    job.refresh_from_db()
    assert job.status == TrainingJob.CANCELLED
    assert 'hx-trigger="every 2s"' not in client.get(f"/jobs/{job.pk}/").text


def test_the_training_page_offers_the_apis_bounds_and_defaults(make_expert):
    from training.forms import PAGE_PARAMS, TrainingForm
    from training.serializers import TrainingParamsSerializer

    form = TrainingForm(expert=make_expert("pydoc"))
    api = TrainingParamsSerializer().fields
    for name in PAGE_PARAMS:
        field, declared = form.fields[name], api[name]
        assert field.help_text == declared.help_text, name
        if hasattr(declared, "min_value"):
            assert (field.min_value, field.max_value) == (declared.min_value, declared.max_value)
        if declared.default is not serializers.empty:
            assert field.initial == declared.default, name


def test_a_short_whole_number_axis_draws_each_tick_once():
    svg = str(line_chart({"loss": [(1, 2.0), (2, 1.5), (3, 1.2)]}, x_label="step"))
    x_ticks = re.findall(r'text-anchor="middle">([^<]+)</text>', svg)[:-1]  # last: the label
    assert x_ticks == ["1", "2", "3"]


def test_a_dataset_name_taken_is_an_error_next_to_the_name(alice):
    make_dataset(alice, name="notes")
    again = logged_in(alice).post(
        "/datasets/", {"name": "notes", "file": io.BytesIO(b"other words here"), "public": ""}
    )
    assert again.status_code == 400 and "already have a dataset named" in again.text
    assert Dataset.objects.filter(owner=alice).count() == 1


def test_a_flood_of_distinct_searches_never_pushes_out_the_log_in_limit(settings, alice):
    # an hour, not a minute: 320 requests may outlast a minute on a loaded machine
    settings.LATENTRY_THROTTLE_RATES = {**settings.LATENTRY_THROTTLE_RATES, "login": "2/hour"}
    settings.LATENTRY_CATALOG_CACHE_SECONDS = 60
    client = Client()
    wrong = {"username": "alice", "password": "guess"}
    assert [client.post("/accounts/login/", wrong).status_code for _ in range(2)] == [200, 200]
    for n in range(320):  # more than a per-process cache keeps (300): each search is cached
        client.get(f"/api/v1/experts/?q=word{n}")
    right = client.post("/accounts/login/", {"username": "alice", "password": "alice-pass-1"})
    assert right.status_code == 429  # the count survived: searches live in their own cache
