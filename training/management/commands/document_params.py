"""Write the table of training-job parameters into docs/architecture.md.

The serializer that bounds them (``training.serializers.TrainingParamsSerializer``) is the
truth; the table between the ``<!-- training-params -->`` markers is generated from it
(``make docs``), and a test fails when the two drift apart.
"""

import re
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand
from rest_framework import fields

from training.serializers import TrainingParamsSerializer

DOC = Path(settings.BASE_DIR) / "docs" / "architecture.md"
MARKERS = ("<!-- training-params -->", "<!-- /training-params -->")


def params_table():
    """The parameters as a Markdown table: name, allowed values, default, meaning."""
    rows = ["| parameter | allowed | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in TrainingParamsSerializer().fields.items():
        rows.append(
            f"| `{name}` | {_allowed(field)} | {_default(field)} | {field.help_text or ''} |"
        )
    return "\n".join(rows)


def _allowed(field):
    if isinstance(field, fields.ChoiceField):
        return ", ".join(f"`{choice}`" for choice in field.choices)
    low, high = getattr(field, "min_value", None), getattr(field, "max_value", None)
    if low is None and high is None:
        return "any"
    return f"{_number(low)} to {_number(high)}"


def _default(field):
    if field.default is fields.empty:
        return "derived (see meaning)" if not field.required else "required"
    return f"`{_number(field.default)}`"


def _number(value):
    if value is None:
        return "any"
    if isinstance(value, float):
        return f"{value:g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value


def with_table(text):
    """``text`` with the table between the markers replaced by the current one."""
    start, end = (re.escape(marker) for marker in MARKERS)
    block = f"{MARKERS[0]}\n{params_table()}\n{MARKERS[1]}"
    updated, count = re.subn(f"{start}.*?{end}", lambda _: block, text, flags=re.S)
    if count != 1:
        raise ValueError(f"{DOC} needs one pair of {MARKERS[0]} markers")
    return updated


class Command(BaseCommand):
    help = "Write the training parameters' table into docs/architecture.md."

    def handle(self, *args, **options):
        DOC.write_text(with_table(DOC.read_text(encoding="utf-8")), encoding="utf-8")
        self.stdout.write(f"wrote the training parameters into {DOC}")
