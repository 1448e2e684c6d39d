import os
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from coprocessor.artifact import ArtifactError
from coprocessor.hub import CARD_TAGS, import_folder, open_in_folder, read_card
from registry import references, storage
from registry.models import (
    MAX_TAGS,
    TAG,
    BaseModel,
    Domain,
    Expert,
    ExpertVersion,
    NameTaken,
    VersionConflict,
)
from registry.quotas import QuotaExceeded

# The figures an export measured on its registry: claims here, kept with the version.
FIGURES = ("measured_gain", "gain_source", "benchmark_gain", "off_domain_change", "latency_ratio")


class Command(BaseCommand):
    help = (
        "Create an expert and its first version from a Hub-style folder (export_expert's, or "
        "`python -m coprocessor export`'s): the file is checked against latentry.json's sha256 "
        "and published like an upload; title, summary, license, tags and card come from "
        "README.md. Nothing is created if anything fails."
    )

    def add_arguments(self, parser):
        parser.add_argument("folder")
        parser.add_argument("--owner", required=True, help="username of the new expert's owner")
        parser.add_argument("--name", help="default: the folder's (latentry.json)")
        parser.add_argument("--domain", help="domain slug (default: the card's)")
        parser.add_argument(
            "--visibility", choices=[c for c, _ in Expert.VISIBILITY_CHOICES], default="private"
        )

    def handle(self, folder, owner, name, domain, visibility, **options):
        owner = _user(owner)
        try:  # read as untrusted: no links, sizes checked before reading, bounded JSON
            path, info, body = import_folder(folder, settings.LATENTRY_MAX_ARTIFACT_BYTES)
            card = read_card(folder)
        except ArtifactError as exc:
            raise CommandError(f"{folder}: {exc}") from exc
        fields = {
            "name": name or str(info.get("name") or ""),
            "title": _clip(card.title, Expert._meta.get_field("title").max_length),
            "summary": _clip(card.summary, Expert._meta.get_field("summary").max_length),
            "model_card": body,
            "license": card.license or Expert._meta.get_field("license").default,
            "domain": _domain(domain or card.domain),
            "base_model": _base_model(info),
            "visibility": visibility,
        }
        fields["tags"] = _tags(card.tags, fields["domain"])
        try:
            Expert(owner=owner, **fields).full_clean(validate_constraints=False)
            version = _create(
                owner, fields, path, info["sha256"], _origin(card, folder), _claims(card)
            )
        except NameTaken as exc:
            raise CommandError(f"{owner.username}: {exc.messages[0]}") from exc
        except QuotaExceeded as exc:
            raise CommandError(f"{folder}: {exc}; nothing was imported") from exc
        except ValidationError as exc:
            raise CommandError(f"{folder}: {'; '.join(_messages(exc))}") from exc
        except (ArtifactError, VersionConflict, storage.StorageUnavailable) as exc:
            raise CommandError(f"{folder}: {exc}; nothing was imported") from exc
        self.stdout.write(
            f"imported {version.expert.full_name} version {version.number} "
            f"({version.sha256[:12]}, {version.kind}, {fields['visibility']})"
        )


def _create(owner, fields, path, sha256, origin, claims):
    """The expert and its first version, in one transaction: both or neither. A publish
    removes what it stored when it fails; if the commit fails after it, the bytes go here."""
    version = None
    try:
        with transaction.atomic():
            expert = Expert.create_for(owner, **fields)
            limit = settings.LATENTRY_MAX_ARTIFACT_BYTES
            with open_in_folder(path.parent, path.name, limit) as f:
                version = ExpertVersion.publish(
                    expert,
                    f,
                    sha256=sha256,  # import_folder checked the file against it
                    size=os.fstat(f.fileno()).st_size,
                    changelog=f"Imported from {origin}.",
                    claimed_metrics=claims,
                )
    except BaseException:
        if version is not None:
            references.discard_unused(version.artifact_key)
        raise
    return version


def _user(username):
    try:
        return get_user_model().objects.get(username=username)
    except get_user_model().DoesNotExist:
        raise CommandError(f"no user named {username!r}") from None


def _domain(slug):
    if not slug:
        raise CommandError("the card names no domain: pass --domain")
    try:
        return Domain.objects.get(slug=slug)
    except Domain.DoesNotExist:
        raise CommandError(f"no domain {slug!r}") from None


def _base_model(info):
    """The imported base model the file was trained for, by the fingerprint it records."""
    fingerprint = str(info.get("base_model_fingerprint") or "")
    base = BaseModel.objects.filter(fingerprint=fingerprint).first() if fingerprint else None
    if base is None:
        source = info.get("base_model") or "its base model"
        raise CommandError(
            f"the expert's base model ({source}, fingerprint {fingerprint[:12] or 'none'}…) is "
            "not imported here: import it first with `manage.py import_base_model`"
        )
    return base


def _tags(tags, domain):
    """The card's tags that Latentry can keep, without the ones every export adds."""
    added = {*CARD_TAGS, domain.slug}
    kept = []
    for tag in (t.strip().lower() for t in tags):
        if TAG.match(tag) and tag not in added and tag not in kept:
            kept.append(tag)
    return kept[:MAX_TAGS]


def _claims(card):
    """The figures the card reports (measured elsewhere): the new version's claimed metrics.
    Numbers and short words only: the card is untrusted, and a figure is never a structure."""
    ours = card.data.get("latentry")
    ours = ours if isinstance(ours, dict) else {}
    claims = {key: ours[key] for key in FIGURES if _figure(ours.get(key))}
    if claims and ours.get("expert"):
        claims["measured_on"] = f"{ours['expert']}@{ours.get('version', '?')}"
    return claims


def _figure(value):
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) or (isinstance(value, str) and 0 < len(value) <= 40)


def _origin(card, folder):
    ours = card.data.get("latentry")
    if isinstance(ours, dict) and ours.get("expert"):
        return f"{ours['expert']} version {ours.get('version', '?')} ({Path(folder).name})"
    return Path(folder).name


def _clip(text, length):
    return text if len(text) <= length else text[: length - 1] + "…"


def _messages(error):
    if hasattr(error, "message_dict"):
        return [f"{field}: {m}" for field, ms in error.message_dict.items() for m in ms]
    return error.messages
