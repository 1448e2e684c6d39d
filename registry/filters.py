"""The catalog's filters, one set for the API's query parameters and the pages' query string."""

import django_filters

from .models import Expert, ExpertVersion


class ExpertFilter(django_filters.FilterSet):
    """Search words, domain, base model, owner, visibility and the kind of a ready version.

    A value that is not one of a choice's options is refused by the API (400) and ignored by
    the pages, as django-filter does for each."""

    q = django_filters.CharFilter(
        method="search",
        help_text="words, every one in the name, title, summary or tags (on PostgreSQL, as the "
        "start of a word there); best matches first unless an ordering is given",
    )
    domain = django_filters.CharFilter(field_name="domain__slug")
    base_model = django_filters.CharFilter(field_name="base_model__slug")
    owner = django_filters.CharFilter(field_name="owner__username")
    visibility = django_filters.ChoiceFilter(choices=Expert.VISIBILITY_CHOICES)
    kind = django_filters.ChoiceFilter(
        choices=ExpertVersion.KIND_CHOICES,
        method="ready_kind",
        help_text="experts with a ready version of this kind",
    )

    class Meta:
        model = Expert
        fields = ["q", "domain", "base_model", "owner", "visibility", "kind"]

    def search(self, queryset, name, value):
        return queryset.search(value)  # annotated with the rank: search.best_first orders by it

    def ready_kind(self, queryset, name, value):
        return queryset.with_ready_version(kind=value)
