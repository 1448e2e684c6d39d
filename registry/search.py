"""The catalog's word search: every word must match, best matches first.

Text becomes terms the same way on every database: the first ``MAX_WORDS`` words, lower-cased,
cut into runs of ``a-z`` and ``0-9`` (``"PyDoc's C++"`` is ``pydoc``, ``s``, ``c``). Nothing
else of the text reaches the query, so no punctuation or operator can change its meaning.

On PostgreSQL each term is a prefix (``pyth`` finds ``python``) matched in a ``tsvector`` of
``search_text`` cut the same way, through a GIN index on that exact expression (migration
0010). On SQLite a term is a substring of ``search_text``. Either way the rank says where the
terms are: the name counts most, then the title (``_rank``); ``best_first`` orders by it.
"""

import re

from django.contrib.postgres.search import SearchQuery, SearchVector
from django.db import connections
from django.db.models import Case, F, Func, IntegerField, Q, TextField, Value, When

RANK = "search_rank"  # the annotation search() adds; callers order by it, best first
MAX_WORDS = 8
MAX_TERMS = 8
TERM = re.compile(r"[a-z0-9]+")

# What search_text is cut into before PostgreSQL indexes it: runs of a-z and 0-9, as the
# terms are. Its own parser would keep "qwen2.5-coder" or "pydoc.topics" whole, and a term
# "coder" or "topics" would never find them. The index (migration 0010) is built on exactly
# the SQL that ``document()`` compiles to, or PostgreSQL would not use it.
SEPARATORS = "[^a-z0-9]+"
CONFIG = "simple"  # no stemming and no stop words: names and tags are not English prose
# The rank: a term in the name counts most, then in the title; summary and tags count none
# beyond matching at all.
NAME_WEIGHT = 2
TITLE_WEIGHT = 1


def terms(text):
    """The terms of ``text``: up to MAX_TERMS runs of a-z and 0-9 from its first MAX_WORDS
    words."""
    pieces = TERM.findall(" ".join(text.lower().split()[:MAX_WORDS]))
    return list(dict.fromkeys(pieces))[:MAX_TERMS]


def document():
    """The tsvector the index holds: search_text cut into a-z0-9 runs."""
    normalized = Func(
        F("search_text"),
        Value(SEPARATORS),
        Value(" "),
        Value("g"),
        function="regexp_replace",
        output_field=TextField(),
    )
    return SearchVector(normalized, config=CONFIG)


def search(queryset, text):
    """Those of ``queryset`` holding every term of ``text``, annotated with RANK (higher is
    better). Text without terms leaves the queryset as it is (rank 0) when it has
    no words at all, and matches nothing when its words have no letters or digits."""
    found = terms(text)
    if not found:
        experts = queryset if not text.split() else queryset.none()
        return experts.annotate(**{RANK: Value(0, output_field=IntegerField())})
    if connections[queryset.db].vendor == "postgresql":
        return _full_text(queryset, found)
    return _substrings(queryset, found)


def best_first(queryset, order):
    """``order`` behind the rank when ``queryset`` is a search's: the best matches first, and
    ``order`` among equals."""
    if RANK in queryset.query.annotations:
        return [F(RANK).desc(), *order]
    return list(order)


def _full_text(queryset, found):
    # Terms are a-z0-9 only, so joining them is a well-formed raw tsquery: "pyth:* & doc:*".
    query = SearchQuery(" & ".join(f"{t}:*" for t in found), config=CONFIG, search_type="raw")
    matched = queryset.alias(search_document=document()).filter(search_document=query)
    return matched.annotate(**{RANK: _rank(found)})


def _substrings(queryset, found):
    experts = queryset
    for term in found:
        experts = experts.filter(search_text__contains=term)
    return experts.annotate(**{RANK: _rank(found)})


def _rank(found):
    """NAME_WEIGHT for each term the name holds and TITLE_WEIGHT for each the title holds.

    Every row has matched all the terms somewhere, so this says where. PostgreSQL's ts_rank
    would have to rebuild each matched row's tsvector from its text (the index keeps none):
    about 60 ms for the 4,000 rows a common word matches among 10,000 experts, where these
    LIKEs take a few."""
    rank = Value(0, output_field=IntegerField())
    for term in found:
        rank += _points(Q(name__contains=term), NAME_WEIGHT)
        rank += _points(Q(title__icontains=term), TITLE_WEIGHT)
    return rank


def _points(condition, points):
    return Case(When(condition, then=Value(points)), default=Value(0), output_field=IntegerField())
