from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from registry.models import ApiKey


class Command(BaseCommand):
    help = "Create an API key for a user and print it once (only its hash is stored)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="cli")
        parser.add_argument("--read-only", action="store_true", help="no write scope")

    def handle(self, username, name, read_only, **options):
        try:
            user = get_user_model().objects.get(username=username)
        except get_user_model().DoesNotExist:
            raise CommandError(f"no user named {username!r}") from None
        scopes = [ApiKey.READ] if read_only else [ApiKey.READ, ApiKey.WRITE]
        try:
            _, plaintext = ApiKey.create_for(user, name, scopes)
        except ValidationError as exc:  # past the user's cap of keys
            raise CommandError(" ".join(exc.messages)) from None
        self.stdout.write(plaintext)
