from rest_framework import permissions

from .models import ApiKey


class ApiKeyScope(permissions.BasePermission):
    """A request made with an API key may write only if the key has the write scope."""

    message = "this API key is read-only; it needs the 'write' scope"

    def has_permission(self, request, view):
        if not isinstance(request.auth, ApiKey) or request.method in permissions.SAFE_METHODS:
            return True
        return request.auth.has_scope(ApiKey.WRITE)


class IsOwnerOrReadOnly(permissions.BasePermission):
    """Anyone who can see the object may read it; only its owner may change it."""

    message = "only the owner may change this"

    def has_object_permission(self, request, view, obj):
        if request.method in permissions.SAFE_METHODS:
            return True
        return getattr(obj, "owner", None) == request.user


class IsAuthor(permissions.BasePermission):
    """Only the review's author may change it."""

    message = "only the author may change this review"

    def has_object_permission(self, request, view, obj):
        return request.method in permissions.SAFE_METHODS or obj.user == request.user
