import tempfile
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from coprocessor.artifact import ArtifactError
from coprocessor.hub import export_folder
from registry.models import Expert, ExpertVersion
from registry.storage import StorageUnavailable


class Command(BaseCommand):
    help = (
        "Write an expert version as a Hugging Face Hub-style folder: the expert file, PEFT "
        "adapter files, latentry.json and a README.md model card whose front matter carries "
        "the base model, license, tags, training datasets and the platform's measured figures. "
        "Runs as the operator: any expert, whatever its visibility; never a rejected version."
    )

    def add_arguments(self, parser):
        parser.add_argument("expert", help="owner/name, or owner/name@ref (number, alias, latest)")
        parser.add_argument("folder", help="where to write (created; must be empty if it exists)")

    def handle(self, expert, folder, **options):
        full_name, _, ref = expert.partition("@")
        found = Expert.objects.named(full_name).select_related("owner", "domain", "base_model")
        expert = found.first()
        if expert is None:
            raise CommandError(f"no expert named {full_name!r}")
        version = expert.version_at(ref)
        if version is None:
            raise CommandError(f"{expert.full_name} has no {_describe(ref)}")
        if version.status != ExpertVersion.READY:
            raise CommandError(
                f"{expert.full_name} version {version.number} was rejected "
                f"({version.status_reason or 'no reason recorded'}): it is never exported"
            )
        folder = Path(folder)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise CommandError(f"{folder} exists and is not an empty folder")
        try:
            data = version.read_verified()
        except StorageUnavailable as exc:
            raise CommandError(f"the artifact store is unavailable: {exc}") from exc
        except ArtifactError as exc:
            version.reject(str(exc))  # as the router does: bytes that changed are never used
            raise CommandError(f"{exc}; the version is rejected now") from exc
        heldout = _heldout(version)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "expert.safetensors"
            path.write_bytes(data)
            export_folder(
                path,
                folder,
                name=expert.name,
                base_model_source=expert.base_model.export_name,
                title=expert.title,
                summary=expert.summary,
                card=expert.model_card,
                license=expert.license,
                domain=expert.domain.slug,
                tags=expert.tags,
                datasets=_datasets(version),
                figures=_figures(expert, version, heldout),
                evaluations=[*_benchmarked(version), *heldout],
            )
        self.stdout.write(
            f"wrote {expert.full_name} version {version.number} ({version.sha256[:12]}) to {folder}"
        )


def _describe(ref):
    return "ready version" if ref in ("", "latest") else f"version {ref!r}"


def _datasets(version):
    """The full names of the datasets the version was trained on (none for an upload)."""
    if version.training_job is None:
        return []
    datasets = version.training_job.datasets.select_related("owner").order_by("owner", "name")
    return [dataset.full_name for dataset in datasets]


def _heldout(version):
    """The version's evaluations on held-out text, as the card's model-index shows them."""
    return [
        e
        for e in version.metrics.get("evaluations", [])
        if e.get("split") == "heldout" and None not in (e.get("ppl_expert"), e.get("reduction_pct"))
    ]


def _benchmarked(version):
    """The platform's measurements of the version on the domain benchmarks, as the card's
    model-index shows them: named by their domain, since a benchmark's text stays hidden."""
    results = version.benchmark_results.select_related("benchmark__domain").order_by(
        "benchmark__domain__slug", "benchmark_id"
    )
    return [
        {
            "dataset": f"latentry-benchmark/{result.benchmark.domain.slug}",
            "dataset_name": f"Latentry {result.benchmark.domain.name} benchmark",
            "split": "benchmark",
            "ppl_expert": result.ppl_expert,
            "reduction_pct": result.reduction_pct,
        }
        for result in results
    ]


def _figures(expert, version, heldout):
    """What the platform measured of this version, as the catalog would show it were it the
    newest (ExpertVersion.measured_gain), with when."""
    gain, source = version.measured_gain()
    if source == Expert.BENCHMARK:
        measured_at = version.benchmarked_at.isoformat() if version.benchmarked_at else None
    else:
        stamps = [e["measured_at"] for e in heldout if e.get("measured_at")]
        measured_at = max(stamps, default=None)
    return {
        "expert": expert.full_name,
        "version": version.number,
        "sha256": version.sha256,
        "measured_gain": gain,
        "gain_source": source,
        "benchmark_gain": version.benchmark_gain,
        "off_domain_change": version.off_domain_change,
        "latency_ratio": version.latency_ratio,
        "measured_at": measured_at,
    }
