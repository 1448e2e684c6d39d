"""A domain's leaderboard: its public experts ranked by their newest ready version's gain on
the domain's benchmarks, measured by the platform on the same held-out pairs for all."""

from dataclasses import dataclass

from django.db.models import F, Max

from registry.models import Domain, Expert, ExpertVersion

from .models import Benchmark


@dataclass
class Leaderboard:
    domain: Domain
    benchmarks: list  # Benchmark rows, each with ``measured_pairs`` (None: nothing measured)
    versions: object  # an ExpertVersion queryset, best first, each with its expert

    @classmethod
    def of(cls, domain):
        benchmarks = (
            Benchmark.objects.filter(domain=domain)
            .select_related("dataset")
            .annotate(measured_pairs=Max("results__pairs"))
        )
        return cls(domain=domain, benchmarks=list(benchmarks), versions=ranked(domain))


def ranked(domain):
    """The newest ready version of each public expert of ``domain`` that has a benchmark
    gain, best first (ties: measured earlier first), with only the columns a row shows."""
    return (
        ExpertVersion.objects.newest_ready()
        .filter(
            expert__domain=domain,
            expert__visibility=Expert.PUBLIC,
            benchmark_gain__isnull=False,
        )
        .select_related("expert__owner")
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
]


def domains_with_benchmarks():
    """Domains that have a leaderboard: one benchmark or more."""
    return Domain.objects.filter(benchmarks__isnull=False).distinct().order_by("name")
