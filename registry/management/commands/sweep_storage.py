from django.core.management.base import BaseCommand

from registry import references


class Command(BaseCommand):
    help = (
        "Remove stored objects (versions, datasets, checkpoints) that no row names and that "
        "are older than LATENTRY_SWEEP_GRACE_S; celery beat runs the same sweep hourly."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="list, remove nothing")

    def handle(self, *args, dry_run=False, **options):
        removed = references.sweep(dry_run=dry_run)
        for key in removed:
            self.stdout.write(key)
        verb = "would remove" if dry_run else "removed"
        self.stdout.write(self.style.SUCCESS(f"{verb} {len(removed)} unreferenced objects"))
