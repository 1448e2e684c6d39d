"""Aliases: owners point names at versions; ``owner/name@alias`` works wherever a number does;
every move is recorded, one atomic step, and a request in flight keeps its version."""

import threading

import pytest
from django.db import connection

from inference import choose, service
from registry.models import AliasMove, ExpertVersion, VersionAlias
from tests.factories import logged_in, slow_steps, wait_for

ALIASES = "/api/v1/experts/alice/words/aliases/"
GENERATE = "/api/v1/generate"


pytestmark = pytest.mark.usefixtures("fresh_pool")


@pytest.fixture
def words(make_expert, publish):
    """alice/words with two ready versions that answer differently."""
    expert = make_expert("words")
    publish(expert, seed=1)
    publish(expert, seed=2)
    return expert


def point(client, alias, version):
    return client.put(f"{ALIASES}{alias}/", {"version": version}, format="json")


def test_the_owner_points_moves_and_removes_an_alias_and_every_move_is_kept(alice_client, words):
    assert point(alice_client, "stable", 1).json() == {
        "name": "stable",
        "version": 1,
        "updated_at": VersionAlias.objects.get().updated_at.isoformat().replace("+00:00", "Z"),
    }
    assert point(alice_client, "stable", 2).status_code == 200
    assert point(alice_client, "candidate", 2).status_code == 200
    listed = alice_client.get(ALIASES).json()
    assert [(a["name"], a["version"]) for a in listed] == [("candidate", 2), ("stable", 2)]
    assert alice_client.delete(f"{ALIASES}candidate/").status_code == 204
    history = alice_client.get("/api/v1/experts/alice/words/alias-moves/").json()["results"]
    assert [(m["alias"], m["from_version"], m["to_version"], m["moved_by"]) for m in history] == [
        ("candidate", 2, None, "alice"),
        ("candidate", None, 2, "alice"),
        ("stable", 1, 2, "alice"),
        ("stable", None, 1, "alice"),
    ]


@pytest.mark.parametrize(
    ("alias", "version", "message"),
    [
        ("latest", 1, "'latest' is built in"),
        ("9lives", 1, "an alias is a letter"),
        ("Stable", 1, "an alias is a letter"),
        ("stable", 7, "has no ready version 7"),
    ],
)
def test_bad_aliases_and_versions_are_400_naming_the_problem(
    alice_client, words, alias, version, message
):
    response = point(alice_client, alias, version)
    assert response.status_code == 400
    assert message in str(response.json())
    assert not VersionAlias.objects.exists() and not AliasMove.objects.exists()


def test_a_rejected_version_cannot_be_pointed_at(alice_client, words):
    words.versions.get(number=2).reject("bytes changed")
    assert point(alice_client, "stable", 2).status_code == 400


def test_only_the_owner_moves_aliases_and_others_read_them(alice_client, bob_client, words):
    point(alice_client, "stable", 1)
    assert point(bob_client, "stable", 2).status_code == 403
    assert bob_client.delete(f"{ALIASES}stable/").status_code == 403
    assert bob_client.get(f"{ALIASES}stable/").json()["version"] == 1
    assert bob_client.get(f"{ALIASES}nothing/").status_code == 404


def test_an_alias_works_for_generation_openai_and_downloads(alice_client, words, decoder):
    point(alice_client, "stable", 1)
    body = {"base": "tiny-llama", "prompt": "w5 w6", "max_new_tokens": 4}
    by_alias = alice_client.post(GENERATE, {**body, "expert": "alice/words@stable"}, format="json")
    by_number = alice_client.post(GENERATE, {**body, "expert": "alice/words@1"}, format="json")
    assert by_alias.json()["expert"] == "alice/words@1"
    assert by_alias.json()["text"] == by_number.json()["text"]
    latest = alice_client.post(GENERATE, {**body, "expert": "alice/words@latest"}, format="json")
    assert latest.json()["expert"] == "alice/words@2"
    openai = alice_client.post(
        "/v1/completions",
        {
            "model": "tiny-llama:alice/words@stable",
            "prompt": "w5 w6",
            "max_tokens": 4,
            "temperature": 0,
        },
        format="json",
    )
    assert (
        openai.status_code == 200
        and openai.json()["choices"][0]["text"] == (by_number.json()["text"])
    )
    detail = alice_client.get("/api/v1/experts/alice/words/versions/stable/").json()
    assert detail["number"] == 1
    download = alice_client.get("/api/v1/experts/alice/words/versions/stable/download/")
    one = words.versions.get(number=1)
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == one.read_verified()
    missing = alice_client.get("/api/v1/experts/alice/words/versions/nothing/")
    assert missing.status_code == 404 and "no version 'nothing'" in missing.json()["detail"]


def test_an_unknown_alias_is_404_and_says_why(alice_client, words):
    body = {"base": "tiny-llama", "prompt": "w5", "max_new_tokens": 2, "expert": "alice/words@x"}
    answer = alice_client.post(GENERATE, body, format="json")
    assert answer.status_code == 404
    assert answer.json()["detail"] == "expert alice/words@x has no such ready version"


def test_a_request_in_flight_keeps_the_version_its_alias_named_when_it_started(
    alice, words, monkeypatch
):
    words.move_alias(alice, "stable", 1)
    ask = service.Ask(
        base="tiny-llama", expert="alice/words@stable", prompt="w5 w6", max_new_tokens=12
    )
    before = service.run(ask, alice)
    slow_steps(monkeypatch, 0.05)  # 12 tokens take 0.6 s: the move lands mid-generation
    pending = service.plan(ask, alice).submit()
    wait_for(lambda: pending.stream.ids, timeout=30, what="the first token")
    words.move_alias(alice, "stable", 2)
    assert not pending.ticket.future.done()  # still generating when the alias moved
    during = pending.answer()
    assert during.expert == "alice/words@1" and during.token_ids == before.token_ids
    after = service.run(ask, alice)
    assert after.expert == "alice/words@2" and after.token_ids != before.token_ids


def test_naming_a_version_by_alias_is_still_one_query(base_model, words, alice, monkeypatch):
    words.move_alias(alice, "stable", 1)
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        choice = choose.named("alice/words@stable", base_model, alice)
    assert choice.version.number == 1 and len(queries) == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_moves_take_turns_and_the_history_is_one_unbroken_chain(
    make_expert, publish, alice
):
    if connection.vendor == "sqlite":
        pytest.skip("SQLite serialises writers itself: the row lock is PostgreSQL's to test")
    expert = make_expert("words")
    publish(expert, seed=1)
    publish(expert, seed=2)

    def mover(number):
        for _ in range(10):
            expert.move_alias(alice, "stable", number)
        connection.close()

    threads = [threading.Thread(target=mover, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    moves = list(AliasMove.objects.order_by("moved_at", "pk"))
    assert len(moves) == 20 and moves[0].from_number is None
    for earlier, later in zip(moves, moves[1:], strict=False):
        assert later.from_number == earlier.to_number  # no move saw a stale "from"
    assert VersionAlias.objects.get().version.number == moves[-1].to_number


def test_the_expert_page_moves_an_alias_and_shows_its_history(alice, bob, words):
    alice_client, bob_client = logged_in(alice), logged_in(bob)
    page = "/experts/alice/words/"
    response = alice_client.post(f"{page}aliases/", {"alias": "stable", "version": "2"})
    assert response.status_code == 302 and response["Location"] == f"{page}#aliases"
    html = alice_client.get(page).content.decode()
    assert "<code>stable</code></td><td>v2</td>" in html and "alias history" in html
    refused = alice_client.post(f"{page}aliases/", {"alias": "latest", "version": "1"})
    assert refused.status_code == 400 and "built in" in refused.content.decode()
    assert bob_client.post(f"{page}aliases/", {"alias": "x", "version": "1"}).status_code == 404
    assert "Move alias" not in bob_client.get(page).content.decode()
    assert ExpertVersion.objects.get(aliases__name="stable").number == 2


def test_aliases_are_bounded_and_a_move_to_where_it_is_records_nothing(
    alice_client, alice, words, settings
):
    settings.LATENTRY_MAX_ALIASES = 2
    assert point(alice_client, "stable", 1).status_code == 200
    assert point(alice_client, "stable", 1).status_code == 200  # already there
    assert AliasMove.objects.count() == 1
    assert point(alice_client, "candidate", 2).status_code == 200
    refused = point(alice_client, "third", 2)
    assert refused.status_code == 400 and "at most 2 aliases" in str(refused.json())
    assert point(alice_client, "stable", 2).status_code == 200  # moving one is not adding one


def test_moving_aliases_is_rate_limited(alice_client, words, settings):
    settings.LATENTRY_THROTTLE_RATES = {**settings.LATENTRY_THROTTLE_RATES, "announce": "2/hour"}
    assert point(alice_client, "stable", 1).status_code == 200
    assert point(alice_client, "stable", 2).status_code == 200
    refused = point(alice_client, "stable", 1)
    assert refused.status_code == 429 and refused.has_header("Retry-After")
    assert alice_client.get(ALIASES).status_code == 200  # reading is not limited
