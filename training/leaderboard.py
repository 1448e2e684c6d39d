"""A domain's leaderboard: its public experts ranked by their newest ready version's gain on
the domain's benchmarks, measured by the platform on the same held-out pairs for all."""

from dataclasses import dataclass

from django.db.models import F, Max, OuterRef, Subquery

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
    gain, best first (ties: measured earlier first)."""
    newest = (
        ExpertVersion.objects.ready()
        .filter(expert=OuterRef("expert"))
        .order_by("-number")
        .values("pk")[:1]
    )
    return (
        ExpertVersion.objects.light()
        .filter(
            expert__domain=domain,
            expert__visibility=Expert.PUBLIC,
            benchmark_gain__isnull=False,
            pk=Subquery(newest),
        )
        .select_related("expert__owner")
        .order_by(F("benchmark_gain").desc(), "benchmarked_at", "pk")
    )


def domains_with_benchmarks():
    """Domains that have a leaderboard, with how many benchmarks and measured versions."""
    return Domain.objects.filter(benchmarks__isnull=False).distinct().order_by("name")
