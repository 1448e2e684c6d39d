"""The generated parts of docs/ match what they are generated from (``make docs``)."""

from training.management.commands.document_params import DOC, with_table


def test_the_training_parameters_table_matches_the_serializer():
    text = DOC.read_text(encoding="utf-8")
    assert with_table(text) == text, "docs/architecture.md is stale: run make docs"
