"""The catalog's word search (registry/search.py): every word must match, a word finds what it
starts, names rank first, and no text breaks the query. On SQLite and PostgreSQL alike; on
PostgreSQL the plan reads the full-text index."""

import re

import pytest
from django.db import connection
from django.db.models import F
from django.test import Client

from registry import search
from registry.models import Expert

pytestmark = pytest.mark.django_db

HOSTILE = [
    "a & b | !c:* '",
    "'",
    "''",
    "\\",
    "python:*",
    "!python",
    "(python | law)",
    "python <-> law",
    "python & | law",
    "%",
    "_",
    "-",
    "日本語",
    "café",
    "x" * 3000,
    " ".join(["python"] * 50),
]
# What each one finds beside "pydoc" (summary "python and law"): only its runs of a-z0-9 count.
MATCHES_PYDOC = {"python:*", "!python", "(python | law)", "python <-> law", "python & | law"}
MATCHES_PYDOC.add(" ".join(["python"] * 50))


def expected(text):
    return ["pydoc"] if text in MATCHES_PYDOC else []


def found(text, queryset=None):
    """The names search finds for ``text``, best first (newest first among equals)."""
    experts = search.search(queryset or Expert.objects.all(), text)
    return [e.name for e in experts.order_by(F(search.RANK).desc(), "-created_at", "-pk")]


def names(response):
    return [e["id"].split("/")[1] for e in response.json()["results"]]


def listed(response):
    """The experts named by the cards of a catalog page, in order."""
    return re.findall(r'/experts/\w+/([\w.-]+)/"><?', response.content.decode())


def test_the_text_becomes_lowercase_letter_and_digit_runs():
    assert search.terms("PyDoc's C++ a&b qwen2.5-coder") == [
        "pydoc",
        "s",
        "c",
        "a",
        "b",
        "qwen2",
        "5",
        "coder",
    ]
    assert search.terms("one two three four five six seven eight nine") == [
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
    ]
    assert search.terms("python python PYTHON") == ["python"]
    assert search.terms("!!! ...") == [] and search.terms("日本語") == []


def test_a_word_finds_what_it_starts(make_expert):
    make_expert("pydoc", summary="The Python standard library")
    make_expert("lawyer", title="Contract law", tags=["legal"])
    assert found("pyth") == ["pydoc"]
    assert found("STAND") == ["pydoc"]
    assert found("leg") == ["lawyer"]
    assert found("contract") == ["lawyer"]


def test_every_word_must_match(make_expert):
    make_expert("pydoc", summary="The Python standard library")
    make_expert("pylaw", summary="Python for contract law")
    assert sorted(found("python")) == ["pydoc", "pylaw"]
    assert found("python law") == ["pylaw"]
    assert found("python law nothing-like-it") == []


def test_names_and_slugs_are_searched_by_their_parts(make_expert):
    make_expert("qwen2.5-coder", title="Qwen coder")
    make_expert("pydoc.topics", title="Topics")
    assert found("coder") == ["qwen2.5-coder"]
    assert found("qwen2.5") == ["qwen2.5-coder"]
    assert found("topics") == ["pydoc.topics"]


def test_a_name_match_ranks_above_a_title_match_above_a_summary_match(make_expert):
    # Made oldest first: newest first alone would list them the other way round.
    make_expert("python-docs", title="Docs")
    make_expert("helper", title="Python helper", summary="Answers questions")
    make_expert("notes", title="Notes", summary="Everything about python")
    assert found("python") == ["python-docs", "helper", "notes"]
    assert found("pyth") == ["python-docs", "helper", "notes"]


def test_more_words_in_the_name_rank_higher(make_expert):
    make_expert("law-python", title="x")
    make_expert("python-notes", title="y", summary="law")  # newer
    assert found("python law") == ["law-python", "python-notes"]


def test_text_without_words_changes_nothing_and_punctuation_alone_finds_nothing(make_expert):
    make_expert("pydoc")
    assert found("") == ["pydoc"] and found("   ") == ["pydoc"]
    assert found("!!! ***") == [] and found("日本語") == []


@pytest.mark.parametrize("text", HOSTILE)
def test_no_text_breaks_the_query(make_expert, text):
    make_expert("pydoc", summary="python and law")
    result = found(text)  # evaluated: a malformed tsquery would raise here
    assert result in ([], ["pydoc"])
    assert result == expected(text)


def test_operators_are_words_not_operators(make_expert):
    make_expert("pydoc", summary="python")
    make_expert("lawyer", summary="law")
    assert found("python | law") == []  # "|" is not "or": both words must match
    assert found("!python") == ["pydoc"]  # "!" is not "not"
    assert found("python:*") == ["pydoc"]


@pytest.mark.parametrize("text", HOSTILE)
def test_the_api_and_the_catalog_answer_any_text(anon_client, make_expert, text):
    make_expert("pydoc", summary="python and law")
    response = anon_client.get("/api/v1/experts/", {"q": text})
    assert response.status_code == 200 and names(response) in ([], ["pydoc"])
    assert names(response) == expected(text)
    assert Client().get("/", {"q": text}).status_code == 200


def test_the_api_lists_a_search_best_first_unless_an_order_is_asked(anon_client, make_expert):
    make_expert("python-docs", title="Docs", download_count=1)
    make_expert("helper", title="Python helper", download_count=9)
    make_expert("notes", title="Notes", summary="python", download_count=50)
    assert names(anon_client.get("/api/v1/experts/", {"q": "python"})) == [
        "python-docs",
        "helper",
        "notes",
    ]
    by_downloads = {"q": "python", "ordering": "-download_count"}
    assert names(anon_client.get("/api/v1/experts/", by_downloads)) == [
        "notes",
        "helper",
        "python-docs",
    ]


def test_the_catalog_page_lists_a_search_best_first_then_by_its_sort(make_expert):
    make_expert("helper", title="Python helper", download_count=9)
    make_expert("notes", title="Notes", summary="python", download_count=50)
    make_expert("python-docs", title="Docs", download_count=1)
    make_expert("python-faq", title="Faq", download_count=3)
    response = Client().get("/", {"q": "python", "sort": "downloads"})
    assert listed(response) == ["python-faq", "python-docs", "helper", "notes"]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's index")
def test_postgresql_reads_the_full_text_index(make_expert):
    """The index is built on the very expression the query compiles to (Django's COALESCE
    included); were they to drift apart, PostgreSQL would scan the table instead."""
    for i in range(50):
        make_expert(f"expert-{i}", summary="python" if i % 10 else "law")
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # a table this small would be scanned
    plan = search.search(Expert.objects.all(), "pyth law").explain()
    assert "registry_expert_search_fts" in plan, plan
