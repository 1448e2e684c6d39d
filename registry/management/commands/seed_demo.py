from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand

from registry.models import Domain

DOMAINS = [
    ("code", "Code", "Programming languages, libraries and their documentation.", None),
    ("python", "Python", "The Python language and its standard library.", "code"),
    ("science", "Science", "Natural sciences and mathematics.", None),
    ("biomed", "Biomedicine", "Biology, medicine and drug design.", "science"),
    ("math", "Mathematics", "Proofs, problems and notation.", "science"),
    ("law", "Law", "Statutes, contracts and case law.", None),
    ("finance", "Finance", "Markets, accounting and economics.", None),
    ("general", "General", "Everyday knowledge and writing.", None),
]


class Command(BaseCommand):
    help = "Create demo domains, a demo user and the default base model. Safe to run twice."

    def add_arguments(self, parser):
        parser.add_argument(
            "--no-base-model",
            action="store_true",
            help="skip importing SmolLM2-135M-Instruct (slow the first time)",
        )

    def handle(self, no_base_model, **options):
        for slug, name, description, parent in DOMAINS:
            Domain.objects.update_or_create(
                slug=slug,
                defaults={
                    "name": name,
                    "description": description,
                    "parent": Domain.objects.get(slug=parent) if parent else None,
                },
            )
        self.stdout.write(f"{len(DOMAINS)} domains")
        self.seed_demo_user()
        if not no_base_model:
            call_command("import_base_model", stdout=self.stdout)

    def seed_demo_user(self):
        User = get_user_model()
        user, created = User.objects.get_or_create(
            username="demo", defaults={"is_staff": True, "is_superuser": True}
        )
        if created:
            # A known password only on a development setup; production sets its own.
            if settings.DEBUG:
                user.set_password("demo")
            else:
                user.set_unusable_password()
            user.save()
            self.stdout.write("demo user created (password 'demo' when DEBUG is on)")
        else:
            self.stdout.write("demo user exists")
