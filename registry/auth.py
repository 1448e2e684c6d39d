"""API authentication: ``Authorization: Bearer lat_<prefix>_<secret>``."""

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import signing
from rest_framework import authentication, exceptions, permissions
from rest_framework.throttling import BaseThrottle

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


class OnBehalfAuthentication(authentication.BaseAuthentication):
    """A web process asking the serving process on a signed-in user's behalf ("try it" when
    LATENTRY_SERVING_URL names the serving service): ``X-Latentry-On-Behalf`` carries the
    user's id signed with the shared SECRET_KEY, valid for a minute."""

    header = "HTTP_X_LATENTRY_ON_BEHALF"
    salt = "latentry.on-behalf"

    @classmethod
    def sign(cls, user):
        return signing.dumps(user.pk if user.is_authenticated else None, salt=cls.salt)

    def authenticate(self, request):
        token = request.META.get(self.header)
        if not token:
            return None
        try:
            user_id = signing.loads(token, salt=self.salt, max_age=60)
        except signing.BadSignature:
            raise exceptions.AuthenticationFailed("invalid on-behalf token") from None
        if user_id is None:
            return None
        user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
        if user is None:
            raise exceptions.AuthenticationFailed("invalid on-behalf token")
        return user, None


def caller(request):
    """Who is asking, for counting: the user (signed in, or through one of their API keys),
    else the client address as DRF's throttles see it."""
    if request.user.is_authenticated:
        return f"user:{request.user.pk}"
    return f"addr:{BaseThrottle().get_ident(request)}"


ANONYMOUS_REFUSED = (
    "sign in, or send an API key (Authorization: Bearer lat_...): this server does not "
    "generate for anonymous callers (LATENTRY_ANONYMOUS_GENERATION)"
)


def anonymous_generation_refused(request):
    """Why ``request``'s caller may not generate here (a caller with no account where the
    setting refuses them), or None. The router's views and the "try it" page ask this."""
    if request.user.is_authenticated or settings.LATENTRY_ANONYMOUS_GENERATION:
        return None
    return ANONYMOUS_REFUSED


class MayGenerate(permissions.BasePermission):
    """401 for an anonymous caller, unless LATENTRY_ANONYMOUS_GENERATION allows them."""

    def has_permission(self, request, view):
        if reason := anonymous_generation_refused(request):
            raise exceptions.NotAuthenticated(reason)
        return True
