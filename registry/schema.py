"""What the OpenAPI schema says beyond what drf-spectacular reads from the views: the API key
scheme, and the error answers every operation may give (so clients, and the fuzzing tests,
can rely on the schema for failures too)."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension

ERROR_SCHEMA = {
    "type": "object",
    "description": (
        "An error: `detail` names the problem; a validation error names each field instead "
        "(`{field: [messages]}`); the OpenAI-compatible endpoints answer `{error: {message, "
        "type, param, code}}`."
    ),
    "properties": {
        "detail": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    },
    "additionalProperties": True,
}
ERROR_STATUSES = {
    "400": "the request is malformed or invalid; the body names the problem",
    "401": "the API key is invalid or revoked",
    "403": "signed in, but not allowed (e.g. a read-only key writing)",
    "404": "no such object, or one you may not see",
    "405": "method not allowed here",
    "409": "conflicts with the current state (e.g. a duplicate name or version)",
    "413": "the upload is over the size limit",
    "415": "unsupported content type",
    "429": "over the rate limit; retry after the `Retry-After` seconds",
    "503": "a backing service (storage) is unavailable; nothing was changed, retry later",
}


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "registry.auth.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key: `Authorization: Bearer lat_<prefix>_<secret>`",
        }


def add_error_responses(result, generator, request, public):
    """drf-spectacular postprocessing hook: every operation documents the error answers."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    reference = {"$ref": "#/components/schemas/Error"}
    for path in result.get("paths", {}).values():
        for operation in path.values():
            responses = operation.setdefault("responses", {})
            for status, description in ERROR_STATUSES.items():
                responses.setdefault(
                    status,
                    {
                        "description": description,
                        "content": {"application/json": {"schema": reference}},
                    },
                )
    return result
