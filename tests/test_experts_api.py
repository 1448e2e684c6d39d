"""Experts over the REST API: catalog, search, filters, ordering, ownership, visibility."""

import pytest

from registry.models import Domain, Expert
from tests.factories import client_for

pytestmark = pytest.mark.django_db


def names(response):
    return [e["id"] for e in response.json()["results"]]


def test_it_creates_an_expert_owned_by_the_caller(alice_client, base_model, domain):
    response = alice_client.post(
        "/api/v1/experts/",
        {
            "name": "pydoc",
            "title": "Python docs",
            "domain": "python",
            "base_model": "tiny-llama",
            "tags": ["python", "docs"],
        },
    )
    assert response.status_code == 201, response.json()
    assert response.json()["id"] == "alice/pydoc"
    assert response.json()["url"] == "/api/v1/experts/alice/pydoc/"
    assert Expert.objects.get().owner.username == "alice"


def test_owner_in_the_body_is_ignored_not_trusted(alice_client, bob, base_model, domain):
    response = alice_client.post(
        "/api/v1/experts/",
        {"name": "x", "domain": "python", "base_model": "tiny-llama", "owner": "bob"},
    )
    assert response.status_code == 201
    assert Expert.objects.get().owner.username == "alice"


def test_anonymous_users_cannot_create(anon_client, base_model, domain):
    response = anon_client.post(
        "/api/v1/experts/", {"name": "x", "domain": "python", "base_model": "tiny-llama"}
    )
    assert response.status_code == 401


def test_a_duplicate_name_is_a_conflict(alice_client, make_expert):
    make_expert("pydoc")
    response = alice_client.post(
        "/api/v1/experts/", {"name": "pydoc", "domain": "python", "base_model": "tiny-llama"}
    )
    assert response.status_code == 409
    assert "already have an expert named 'pydoc'" in response.json()["detail"]


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"name": "Bad Name!", "domain": "python", "base_model": "tiny-llama"}, "name"),
        ({"name": "ok", "domain": "nope", "base_model": "tiny-llama"}, "domain"),
        ({"name": "ok", "domain": "python", "base_model": "nope"}, "base_model"),
        (
            {"name": "ok", "domain": "python", "base_model": "tiny-llama", "visibility": "x"},
            "visibility",
        ),
        (
            {"name": "ok", "domain": "python", "base_model": "tiny-llama", "tags": ["NO TAG"]},
            "tags",
        ),
        ({"name": "ok", "domain": "python", "base_model": "tiny-llama", "colour": "red"}, "colour"),
        ({"domain": "python", "base_model": "tiny-llama"}, "name"),
    ],
)
def test_bad_fields_are_named_and_change_nothing(alice_client, base_model, domain, payload, field):
    response = alice_client.post("/api/v1/experts/", payload)
    assert response.status_code == 400
    assert field in response.json()
    assert not Expert.objects.exists()


def test_malformed_json_is_a_400(alice_client, base_model, domain):
    response = alice_client.post(
        "/api/v1/experts/", data='{"name": "x",', content_type="application/json"
    )
    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]


def test_only_the_owner_may_update_or_delete(bob_client, alice_client, make_expert):
    make_expert("pydoc")
    assert bob_client.patch("/api/v1/experts/alice/pydoc/", {"title": "mine"}).status_code == 403
    assert bob_client.delete("/api/v1/experts/alice/pydoc/").status_code == 403
    response = alice_client.patch("/api/v1/experts/alice/pydoc/", {"title": "Python 3.13 docs"})
    assert response.status_code == 200
    assert response.json()["title"] == "Python 3.13 docs"
    assert alice_client.delete("/api/v1/experts/alice/pydoc/").status_code == 204
    assert not Expert.objects.exists()


def test_name_and_base_model_cannot_change(alice_client, make_expert):
    make_expert("pydoc")
    response = alice_client.patch("/api/v1/experts/alice/pydoc/", {"name": "other"})
    assert response.status_code == 400
    assert "renamed" in response.json()["name"][0]


def test_unknown_experts_are_404(anon_client, alice):
    assert anon_client.get("/api/v1/experts/alice/nothing/").status_code == 404
    assert anon_client.get("/api/v1/experts/nobody/nothing/").status_code == 404


def test_private_experts_exist_only_for_their_owner(alice, bob, sam, make_expert):
    make_expert("secret", visibility=Expert.PRIVATE)
    for client in (client_for(None), client_for(bob)):
        assert client.get("/api/v1/experts/alice/secret/").status_code == 404
        assert client.patch("/api/v1/experts/alice/secret/", {"title": "x"}).status_code in (
            401,
            404,
        )
        assert client.get("/api/v1/experts/alice/secret/versions/").status_code == 404
        assert names(client.get("/api/v1/experts/")) == []
        assert client.get("/api/v1/experts/").json()["count"] == 0
    assert client_for(alice).get("/api/v1/experts/alice/secret/").status_code == 200
    assert client_for(sam).get("/api/v1/experts/alice/secret/").status_code == 200


def test_unlisted_experts_open_by_name_but_stay_out_of_the_catalog(bob, make_expert):
    make_expert("hidden", visibility=Expert.UNLISTED)
    bob_client = client_for(bob)
    assert bob_client.get("/api/v1/experts/alice/hidden/").status_code == 200
    assert names(bob_client.get("/api/v1/experts/")) == []
    assert names(bob_client.get("/api/v1/experts/?q=hidden")) == []


def test_search_matches_words_in_name_title_summary_and_tags(anon_client, make_expert):
    make_expert("pydoc", summary="The Python standard library")
    make_expert("lawyer", title="Contract law", tags=["legal"])
    assert names(anon_client.get("/api/v1/experts/?q=standard")) == ["alice/pydoc"]
    assert names(anon_client.get("/api/v1/experts/?q=legal")) == ["alice/lawyer"]
    assert names(anon_client.get("/api/v1/experts/?q=contract law")) == ["alice/lawyer"]
    assert names(anon_client.get("/api/v1/experts/?q=PyDoc STANDARD")) == ["alice/pydoc"]
    assert names(anon_client.get("/api/v1/experts/?q=nothing-like-it")) == []


def test_filters_by_domain_base_model_and_owner(anon_client, bob, make_expert):
    law = Domain.objects.create(slug="law", name="Law")
    make_expert("pydoc")
    make_expert("lawyer", domain=law, owner=bob)
    assert names(anon_client.get("/api/v1/experts/?domain=law")) == ["bob/lawyer"]
    assert names(anon_client.get("/api/v1/experts/?owner=alice")) == ["alice/pydoc"]
    assert len(names(anon_client.get("/api/v1/experts/?base_model=tiny-llama"))) == 2
    assert names(anon_client.get("/api/v1/experts/?base_model=other")) == []


def test_ordering_by_downloads_rating_and_newest(anon_client, make_expert):
    make_expert("a", download_count=5, rating=None)
    make_expert("b", download_count=50, rating=4.5)
    make_expert("c", download_count=1, rating=2.0)
    assert names(anon_client.get("/api/v1/experts/?ordering=-download_count")) == [
        "alice/b",
        "alice/a",
        "alice/c",
    ]
    # Unrated experts sort last whichever way.
    assert names(anon_client.get("/api/v1/experts/?ordering=-rating")) == [
        "alice/b",
        "alice/c",
        "alice/a",
    ]
    assert names(anon_client.get("/api/v1/experts/?ordering=rating")) == [
        "alice/c",
        "alice/b",
        "alice/a",
    ]
    assert names(anon_client.get("/api/v1/experts/")) == ["alice/c", "alice/b", "alice/a"]
    assert anon_client.get("/api/v1/experts/?ordering=owner__password").status_code == 200


def test_lists_are_paginated(anon_client, make_expert):
    for i in range(5):
        make_expert(f"e{i}")
    page = anon_client.get("/api/v1/experts/?page_size=2").json()
    assert page["count"] == 5
    assert len(page["results"]) == 2
    assert page["next"]
    assert anon_client.get("/api/v1/experts/?page=99").status_code == 404


def test_the_catalog_runs_a_constant_number_of_queries(
    anon_client, make_expert, bob, django_assert_num_queries
):
    for i in range(3):
        make_expert(f"small{i}")
    with django_assert_num_queries(2) as small:
        anon_client.get("/api/v1/experts/?page_size=3")
    for i in range(30):
        make_expert(f"big{i}", owner=bob if i % 2 else None)
    with django_assert_num_queries(2):
        response = anon_client.get("/api/v1/experts/?page_size=30")
    assert len(response.json()["results"]) == 30
    assert len(small.captured_queries) == 2


def test_anonymous_catalog_pages_are_cached_for_a_few_seconds(
    anon_client, alice_client, make_expert, settings, django_assert_num_queries
):
    settings.LATENTRY_CATALOG_CACHE_SECONDS = 60
    make_expert("first")
    assert names(anon_client.get("/api/v1/experts/")) == ["alice/first"]
    make_expert("second")
    with django_assert_num_queries(0):
        assert names(anon_client.get("/api/v1/experts/")) == ["alice/first"]
    # Signed-in users are always answered fresh.
    assert names(alice_client.get("/api/v1/experts/")) == ["alice/second", "alice/first"]
    # A search is cached too, each one by its own address.
    assert names(anon_client.get("/api/v1/experts/?q=first")) == ["alice/first"]
    assert names(anon_client.get("/api/v1/experts/?q=second")) == ["alice/second"]
    make_expert("first-again")
    with django_assert_num_queries(0):
        assert names(anon_client.get("/api/v1/experts/?q=first")) == ["alice/first"]
    assert names(alice_client.get("/api/v1/experts/?q=first")) == [
        "alice/first-again",
        "alice/first",
    ]
    settings.LATENTRY_CATALOG_CACHE_SECONDS = 0
    assert names(anon_client.get("/api/v1/experts/")) == [
        "alice/first-again",
        "alice/second",
        "alice/first",
    ]


def test_base_models_and_domains_are_readable(anon_client, base_model, domain):
    assert anon_client.get("/api/v1/base-models/").json()["results"][0]["slug"] == "tiny-llama"
    assert anon_client.get("/api/v1/base-models/tiny-llama/").json()["num_layers"] == 2
    assert anon_client.get("/api/v1/domains/python/").json()["name"] == "Python"
    assert anon_client.post("/api/v1/domains/", {"slug": "x"}).status_code in (401, 405)


def test_the_catalog_filters_by_the_kind_of_a_ready_version(anon_client, make_expert, publish):
    publish(make_expert("trained"))
    make_expert("empty")
    publish(make_expert("rejected")).reject("stored bytes do not match")
    assert names(anon_client.get("/api/v1/experts/?kind=lora")) == ["alice/trained"]
    assert names(anon_client.get("/api/v1/experts/?kind=full")) == []
    assert anon_client.get("/api/v1/experts/?kind=nope").status_code == 400


def test_the_latest_version_is_the_newest_ready_one(anon_client, make_expert, publish):
    expert = make_expert("pydoc")
    publish(expert)
    publish(expert, seed=1).reject("stored bytes do not match")
    assert anon_client.get("/api/v1/experts/alice/pydoc/").json()["latest_version"] == 1


@pytest.mark.parametrize(
    "tags, message",
    [
        (["NO TAG"], "'NO TAG': tags are 1-40 lowercase letters, digits or '-'"),
        ([f"t{i}" for i in range(21)], "at most 20 tags"),
    ],
)
def test_tag_rules_say_what_is_wrong(alice_client, base_model, domain, tags, message):
    response = alice_client.post(
        "/api/v1/experts/",
        {"name": "ok", "domain": "python", "base_model": "tiny-llama", "tags": tags},
    )
    assert response.status_code == 400
    assert response.json() == {"tags": [message]}
