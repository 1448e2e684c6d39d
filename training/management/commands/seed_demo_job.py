import json

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile
from django.core.management.base import BaseCommand, CommandError

from coprocessor import base_models, corpus
from registry import storage
from registry.models import BaseModel, Domain, Expert
from training import datasets, runner
from training.models import Benchmark, Dataset, JobLimitReached, TrainingJob
from training.serializers import TrainingParamsSerializer

CARD = """# Python documentation expert

Trained on the Python documentation that CPython ships (`pydoc_data.topics`) by the demo job
that `make run` queues. Its measured perplexity reduction on held-out topics appears on this
page when the evaluation job that follows the training finishes, and its figures on the Python
benchmark (the same held-out tail, which no job trains on) on the Python leaderboard. In the
demo that text is CPython's own documentation, which anyone has: it shows the mechanism; a real
benchmark is text nobody else holds.
"""

# The steps the default recipe ran in 15 CPU-minutes on the Python docs on a quiet 2-core
# machine (bench/quality.py: 169, 23% lower held-out perplexity; docs/method.md). A step
# count, not minutes: on a machine that also serves, minutes buy fewer steps.
DEMO_STEPS = 170


class Command(BaseCommand):
    help = (
        "Demo data for jobs: the Python documentation as a public dataset, its held-out tail "
        "as the Python domain's benchmark, and one queued training job that publishes "
        "demo/python-docs. Does nothing if that job exists."
    )

    def add_arguments(self, parser):
        parser.add_argument("--base-model", default=base_models.DEFAULT_SLUG)
        parser.add_argument(
            "--steps",
            type=int,
            default=DEMO_STEPS,
            help="training steps: what the default recipe takes in 15 quiet CPU-minutes, so "
            "the demo expert reaches its figure however busy the machine is",
        )
        parser.add_argument("--minutes", type=float, default=60.0, help="the most the job may take")

    def handle(self, base_model, steps, minutes, **options):
        user = get_user_model().objects.filter(username="demo").first()
        base = BaseModel.objects.filter(slug=base_model).first()
        if user is None or base is None:
            raise CommandError("run seed_demo first (the demo user and base model)")
        python, _ = Domain.objects.get_or_create(slug="python", defaults={"name": "Python"})
        dataset = self.python_docs(user, base)
        self.python_benchmark(user, base, python, dataset)
        expert, _ = Expert.objects.get_or_create(
            owner=user,
            name="python-docs",
            defaults={
                "title": "Python documentation",
                "summary": "Knows the Python language reference and library docs.",
                "model_card": CARD,
                "domain": python,
                "base_model": base,
                "tags": ["python", "docs", "demo"],
            },
        )
        if TrainingJob.objects.filter(expert=expert).exists():
            self.stdout.write(f"demo training job for {expert} exists")
            return
        params = TrainingParamsSerializer(data={"steps": steps, "time_budget_s": minutes * 60})
        if not params.is_valid():
            raise CommandError(f"the demo job was not queued: {params.errors}")
        try:
            job = TrainingJob.start(user, expert, [dataset], dict(params.validated_data))
        except ValidationError as exc:  # e.g. the base model's context is shorter than the window
            raise CommandError(f"the demo job was not queued: {exc.messages[0]}") from exc
        except JobLimitReached as exc:  # the demo user's limits hold here as everywhere
            raise CommandError(f"the demo job was not queued: {exc}") from exc
        self.stdout.write(f"queued {job} ({steps} steps, at most {minutes:g} minutes)")

    def python_docs(self, user, base):
        found = Dataset.objects.filter(owner=user, name="python-docs").first()
        if found is not None:
            return found
        lines = "\n".join(json.dumps({"text": text}) for _, text in corpus.pydoc_topics())
        data = ContentFile(lines.encode(), name="python-docs.jsonl")
        dataset = datasets.create(
            user,
            "python-docs",
            data,
            sha256=storage.sha256_of(data),
            size=data.size,
            fmt=Dataset.JSONL,
            base_model=base,
            domain=Domain.objects.filter(slug="python").first(),
            description="The Python documentation that CPython ships (pydoc_data.topics).",
            public=True,
        )
        self.stdout.write(f"created dataset {dataset} ({dataset.token_count} tokens)")
        return dataset

    def python_benchmark(self, user, base, domain, training_set):
        """The held-out tail of the training set (what no job trains on) as the Python
        domain's benchmark, owned by the staff user ``demo``."""
        if Dataset.objects.filter(owner=user, name="python-docs-benchmark").exists():
            return
        _, heldout = runner.dataset_splits(training_set)
        data = ContentFile("\n".join(heldout).encode(), name="python-docs-benchmark.txt")
        benchmark_set = datasets.create(
            user,
            "python-docs-benchmark",
            data,
            sha256=storage.sha256_of(data),
            size=data.size,
            fmt=Dataset.TEXT,
            base_model=base,
            description="The held-out tail of demo/python-docs: the Python benchmark.",
        )
        Benchmark.add(
            user, training_set.domain, benchmark_set, window=256, ahead=16, max_windows=32
        )
        self.stdout.write(f"added {benchmark_set} as the Python benchmark")
