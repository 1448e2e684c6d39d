"""Who reaches what: one table over the endpoints and pages that matter, for each caller
against alice's public, unlisted and private expert. A private expert's existence never leaks:
others get 404 (never 403) wherever it is named, and it is absent from lists, counts, search,
/v1/models and `auto`.

Callers: anonymous; bob (a plain user); alice (the owner); staff; and API keys: bob's read-only
key, alice's read-only key, alice's read-write key.
"""

import io

import pytest
from django.test import Client
from rest_framework.test import APIClient

from registry.models import ApiKey
from tests.factories import bearer_client

pytestmark = pytest.mark.django_db

VISIBILITIES = ["public", "unlisted", "private"]
CALLERS = ["anon", "bob", "alice", "staff", "bob_read", "alice_read", "alice_write"]


def each(public, unlisted, private):
    return {"public": public, "unlisted": unlisted, "private": private}


def same(status):
    return each(status, status, status)


# Expected status per caller; a caller left out gets the row's "default".
OPEN = each(200, 200, 404)  # reading by name: public and unlisted for all, private for the owner
OWNER_SEES = {**{c: OPEN for c in CALLERS}, "alice": same(200), "staff": same(200)}
OWNER_SEES.update(alice_read=same(200), alice_write=same(200))
# Pages go by the session; an API key signs nobody in there, so its holder reads as anonymous.
PAGE_SEES = {**OWNER_SEES, "alice_read": OPEN, "alice_write": OPEN}
# Trying an expert generates, which needs an account by default (LATENTRY_ANONYMOUS_GENERATION):
# 401 where the page could be seen; a private expert stays a 404.
SIGNED_OUT = each(401, 401, 404)
PAGE_TRIES = {
    **PAGE_SEES,
    **{c: SIGNED_OUT for c in ("anon", "bob_read", "alice_read", "alice_write")},
}

ROWS = {
    "GET expert": ("get", "/api/v1/experts/alice/{name}/", None, OWNER_SEES),
    "GET versions": ("get", "/api/v1/experts/alice/{name}/versions/", None, OWNER_SEES),
    "GET version": ("get", "/api/v1/experts/alice/{name}/versions/1/", None, OWNER_SEES),
    "GET download": ("get", "/api/v1/experts/alice/{name}/versions/1/download/", None, OWNER_SEES),
    "GET reviews": ("get", "/api/v1/experts/alice/{name}/reviews/", None, OWNER_SEES),
    "PATCH expert": (
        "patch",
        "/api/v1/experts/alice/{name}/",
        {"title": "changed"},
        {
            "anon": same(401),  # refused before any lookup: says nothing of existence
            "bob": each(403, 403, 404),
            "alice": same(200),
            "staff": each(403, 403, 403),
            "bob_read": same(403),  # a read-only key is refused before any lookup
            "alice_read": same(403),
            "alice_write": same(200),
        },
    ),
    "POST version (invalid file)": (
        "post_file",
        "/api/v1/experts/alice/{name}/versions/",
        None,
        {
            "anon": same(401),
            "bob": each(403, 403, 404),
            "alice": same(400),  # past every check: the file itself is refused
            "staff": each(403, 403, 403),
            "bob_read": same(403),
            "alice_read": same(403),
            "alice_write": same(400),
        },
    ),
    "POST review": (
        "post",
        "/api/v1/experts/alice/{name}/reviews/",
        {"stars": 4},
        {
            "anon": same(401),
            "bob": each(201, 201, 404),
            "alice": same(403),  # not of one's own
            "staff": same(201),
            "bob_read": same(403),
            "alice_read": same(403),
            "alice_write": same(403),
        },
    ),
    "GET version @latest": (
        "get",
        "/api/v1/experts/alice/{name}/versions/latest/",
        None,
        OWNER_SEES,
    ),
    "GET aliases": ("get", "/api/v1/experts/alice/{name}/aliases/", None, OWNER_SEES),
    "GET alias moves": ("get", "/api/v1/experts/alice/{name}/alias-moves/", None, OWNER_SEES),
    "PUT alias": (
        "put",
        "/api/v1/experts/alice/{name}/aliases/stable/",
        {"version": 1},
        {
            "anon": same(401),
            "bob": each(403, 403, 404),
            "alice": same(200),
            "staff": each(403, 403, 403),  # staff may read any expert, not move its aliases
            "bob_read": same(403),
            "alice_read": same(403),
            "alice_write": same(200),
        },
    ),
    "page: expert": ("page", "/experts/alice/{name}/", None, PAGE_SEES),
    "page: edit": (
        "page",
        "/experts/alice/{name}/edit/",
        None,
        {
            **{c: same(302) for c in ("anon", "bob_read", "alice_read", "alice_write")},
            "bob": same(404),
            "alice": same(200),
            "staff": same(404),
        },
    ),
    "page: try it": (
        "page_post",
        "/experts/alice/{name}/try/",
        {"prompt": "w5 w6", "max_new_tokens": 1},
        PAGE_TRIES,
    ),
    "page: train": (
        "page",
        "/experts/alice/{name}/train/",
        None,
        {
            **{c: same(302) for c in ("anon", "bob_read", "alice_read", "alice_write")},
            "bob": same(404),
            "alice": same(200),
            "staff": same(404),
        },
    ),
}


@pytest.fixture
def callers(alice, bob, sam):
    """A client per caller. Keys go in the Authorization header; pages use sessions only."""

    def session(user):
        client = APIClient()
        if user is not None:
            client.force_login(user)
        return client

    return {
        "anon": session(None),
        "bob": session(bob),
        "alice": session(alice),
        "staff": session(sam),
        "bob_read": bearer_client(bob, [ApiKey.READ]),
        "alice_read": bearer_client(alice, [ApiKey.READ]),
        "alice_write": bearer_client(alice, [ApiKey.READ, ApiKey.WRITE]),
    }


@pytest.fixture
def experts(make_expert, publish):
    made = {}
    for visibility in VISIBILITIES:
        expert = make_expert(f"{visibility}-x", visibility=visibility, summary="matrix words")
        publish(expert)
        made[visibility] = expert
    return made


def call(client, method, path, body):
    if method == "get" or method == "page":
        return client.get(path)
    if method == "post_file":
        return client.post(path, {"file": io.BytesIO(b"not safetensors")}, format="multipart")
    if method == "page_post":
        return client.post(path, body, format="multipart")  # a browser's form
    return getattr(client, method)(path, body, format="json")


@pytest.mark.parametrize("caller", CALLERS)
def test_the_access_matrix(caller, callers, experts, settings):
    """Every row of the table for one caller (one set-up for the lot); all mismatches at once."""
    settings.LATENTRY_THROTTLE_RATES = {"generate": None, "upload": None}
    wrong = {}
    for row, (method, template, body, expected) in ROWS.items():
        got = {
            visibility: call(callers[caller], method, template.format(name=expert.name), body)
            for visibility, expert in experts.items()
        }
        got = {visibility: response.status_code for visibility, response in got.items()}
        if got != expected[caller]:
            wrong[row] = {"expected": expected[caller], "got": got}
    assert not wrong, f"as {caller}: {wrong}"


def names_in(response_json, key="results"):
    return {item["id"].split("/")[-1] for item in response_json[key]}


@pytest.mark.parametrize("caller", CALLERS)
def test_lists_counts_search_and_models_never_show_others_private_experts(caller, callers, experts):
    client = callers[caller]
    owner = caller.startswith("alice")
    expected = {"public-x", "unlisted-x", "private-x"} if owner else {"public-x"}
    catalog = client.get("/api/v1/experts/", {"q": "matrix"}).json()
    assert names_in(catalog) == expected and catalog["count"] == len(expected)
    by_owner = client.get("/api/v1/experts/", {"owner": "alice"}).json()
    assert by_owner["count"] == len(expected)
    models = {m["id"] for m in client.get("/v1/models").json()["data"]}
    listed = {m.split("/")[-1] for m in models if m.startswith("tiny-llama:alice/")}
    assert listed == expected
    private = client.post(
        "/api/v1/generate",
        {"base": "tiny-llama", "expert": "alice/private-x", "prompt": "w5", "max_new_tokens": 1},
        format="json",
    )
    # By name, staff may use any expert (as they may open it); listing is another matter.
    if owner or caller == "staff":
        assert private.json()["augmented"] is True, private.json()
    elif caller == "anon":  # generating needs an account (LATENTRY_ANONYMOUS_GENERATION)
        assert private.status_code == 401
    else:  # the same answer as for an expert that does not exist
        assert private.status_code == 404 and "not found" in private.json()["detail"]


@pytest.mark.parametrize("caller", ["anon", "bob", "alice", "staff"])
def test_pages_never_show_others_private_experts(caller, callers, experts):
    page = Client()
    session_user = {"bob": "bob", "alice": "alice", "staff": "sam"}.get(caller)
    if session_user:
        from django.contrib.auth import get_user_model

        page.force_login(get_user_model().objects.get(username=session_user))
    catalog = page.get("/", {"q": "matrix"}).content.decode()
    publisher = page.get("/publishers/alice/").content.decode()
    owner = caller == "alice"
    assert ("private-x" in catalog) is owner and ("private-x" in publisher) is owner
    assert ("unlisted-x" in catalog) is owner
    count = "3 experts" if owner else "1 expert"
    assert count in catalog and count in publisher
