from django.db import migrations

FULL_TEXT_INDEX = "registry_expert_search_fts"
TRIGRAM_INDEX = "registry_expert_search_text_trgm"  # 0002's, for LIKE: no query uses it now

# Exactly what registry.search.document() compiles to, so that PostgreSQL matches the query's
# expression to the index's: Django wraps the text in COALESCE(..., '') and passes the config as
# 'simple'::regconfig. Change both together (tests/test_search.py checks the plan).
DOCUMENT = (
    "to_tsvector('simple'::regconfig, "
    "COALESCE(regexp_replace(search_text, '[^a-z0-9]+', ' ', 'g'), ''))"
)


def create_full_text_index(apps, schema_editor):
    """On PostgreSQL, let the catalog's search find prefixes of words through a GIN index.

    SQLite has no such index; its search stays a LIKE per word, which is fine at its scale.
    The trigram index that answered PostgreSQL's LIKE goes: nothing searches that way now.
    """
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(
        f"CREATE INDEX {FULL_TEXT_INDEX} ON registry_expert USING gin (({DOCUMENT}))"
    )
    schema_editor.execute(f"DROP INDEX IF EXISTS {TRIGRAM_INDEX}")


def drop_full_text_index(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(
        f"CREATE INDEX {TRIGRAM_INDEX} ON registry_expert USING gin (search_text gin_trgm_ops)"
    )
    schema_editor.execute(f"DROP INDEX IF EXISTS {FULL_TEXT_INDEX}")


class Migration(migrations.Migration):
    dependencies = [
        ("registry", "0009_aliases_and_benchmark_figures"),
    ]

    operations = [
        migrations.RunPython(create_full_text_index, drop_full_text_index),
    ]
