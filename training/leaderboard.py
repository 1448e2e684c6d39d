"""A domain's leaderboard: its public experts ranked by their newest ready version's gain on
the domain's benchmarks, measured by the platform on the same held-out pairs for every expert
of a base model (another base model's tokenizer cuts the text into other pairs: filter by
``base_model`` to compare like with like)."""

from dataclasses import dataclass

from django.db.models import F, Max

from registry.models import BaseModel, Domain, Expert, ExpertVersion

from .models import Benchmark


@dataclass
class Leaderboard:
    domain: Domain
    base_model: BaseModel | None  # None: every base model's experts
    base_models: list  # the base models of the domain's ranked experts, to filter by
    benchmarks: list  # Benchmark rows, each with ``measured_pairs`` (None: nothing measured)
    versions: object  # an ExpertVersion queryset, best first, each with its expert

    @classmethod
    def of(cls, domain, base_model=None):
        benchmarks = (
            Benchmark.objects.filter(domain=domain)
            .select_related("dataset")
            .annotate(measured_pairs=Max("results__pairs"))
        )
        every_base = ranked(domain).values("expert__base_model")
        return cls(
            domain=domain,
            base_model=base_model,
            base_models=list(BaseModel.objects.filter(pk__in=every_base).only("slug")),
            benchmarks=list(benchmarks),
            versions=ranked(domain, base_model),
        )


def ranked(domain, base_model=None):
    """The newest ready version of each public expert of ``domain`` (of ``base_model``, if
    given) that has a benchmark gain, best first (ties: measured earlier first), with only the
    columns a row shows."""
    versions = ExpertVersion.objects.newest_ready().filter(
        expert__domain=domain,
        expert__visibility=Expert.PUBLIC,
        benchmark_gain__isnull=False,
    )
    if base_model is not None:
        versions = versions.filter(expert__base_model=base_model)
    return (
        versions.select_related("expert__owner", "expert__base_model")
        .only(*ROW_FIELDS)
        .order_by(F("benchmark_gain").desc(), "benchmarked_at", "pk")
    )


ROW_FIELDS = [
    "number",
    "size",
    "benchmark_gain",
    "off_domain_change",
    "latency_ratio",
    "benchmarked_at",
    "expert__name",
    "expert__download_count",
    "expert__owner__username",
    "expert__base_model__slug",
]


def domains_with_benchmarks():
    """Domains that have a leaderboard: one benchmark or more."""
    return Domain.objects.filter(benchmarks__isnull=False).distinct().order_by("name")
