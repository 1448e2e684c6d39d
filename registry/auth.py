"""API authentication: ``Authorization: Bearer lat_<prefix>_<secret>``."""

from rest_framework import authentication, exceptions

from .models import ApiKey


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        scheme, _, plaintext = header.partition(" ")
        if scheme != self.keyword:
            return None
        plaintext = plaintext.strip()
        prefix = ApiKey.parse_prefix(plaintext)
        key = (
            ApiKey.objects.select_related("user").filter(prefix=prefix, revoked_at=None).first()
            if prefix
            else None
        )
        if key is None or not key.matches(plaintext) or not key.user.is_active:
            raise exceptions.AuthenticationFailed("invalid or revoked API key")
        key.touch()
        return key.user, key

    def authenticate_header(self, request):
        return f'{self.keyword} realm="api"'
