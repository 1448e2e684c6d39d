"""What the pages of other apps show of the platform's measurements, without importing this app
(the registry comes first in the layout): ``{% load measurements %}``."""

from django import template

from training.models import EvaluationJob

register = template.Library()


@register.simple_tag
def measurement_note(version):
    """Why ``version`` has no benchmark figure yet (queued, waiting, failed), or ''."""
    return EvaluationJob.measurement_note(version) if version else ""


@register.simple_tag(takes_context=True)
def pairings(context, expert):
    """``expert``'s measured pairings that the viewer may see (``EvaluationJob.pairings``)."""
    return EvaluationJob.pairings(expert, context["request"].user)
