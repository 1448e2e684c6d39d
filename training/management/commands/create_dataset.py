from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from registry import quotas, storage
from registry.models import BaseModel, Domain
from training import datasets


class Command(BaseCommand):
    help = "Create a dataset from a local .txt or .jsonl file, validated like an upload."

    def add_arguments(self, parser):
        parser.add_argument("path")
        parser.add_argument("--owner", required=True, help="username")
        parser.add_argument("--name", help="default: the file name")
        parser.add_argument("--domain", help="domain slug")
        parser.add_argument("--base-model", help="count tokens with this base model's tokenizer")
        parser.add_argument("--description", default="")
        parser.add_argument("--public", action="store_true", help="others may train on it")

    def handle(self, path, owner, name, domain, base_model, description, public, **options):
        path = Path(path)
        try:
            user = get_user_model().objects.get(username=owner)
            domain = Domain.objects.get(slug=domain) if domain else None
            base = BaseModel.objects.get(slug=base_model) if base_model else None
        except (get_user_model().DoesNotExist, Domain.DoesNotExist, BaseModel.DoesNotExist) as exc:
            raise CommandError(str(exc)) from exc
        try:
            with path.open("rb") as f:
                dataset = datasets.create(
                    user,
                    name or path.stem.lower(),
                    f,
                    sha256=storage.sha256_of(f),
                    size=path.stat().st_size,
                    fmt=datasets.format_of(path.name),
                    base_model=base,
                    domain=domain,
                    description=description,
                    public=public,
                )
        except (OSError, datasets.DatasetError, datasets.NameTaken, quotas.QuotaExceeded) as exc:
            raise CommandError(f"{path}: {exc}") from exc
        self.stdout.write(
            f"created dataset {dataset.full_name}: {dataset.documents} documents, "
            f"{dataset.size} bytes, {dataset.token_count or 'uncounted'} tokens"
        )
