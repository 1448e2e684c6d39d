"""The router's HTTP interfaces: /api/v1/generate, /api/v1/attach, /api/v1/usage/ and the
OpenAI-compatible /v1/models, /v1/completions, /v1/chat/completions (with streaming)."""

import base64
import contextlib
import json
import time
import uuid

from adrf.views import APIView as AsyncAPIView
from asgiref.sync import sync_to_async
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import generics
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView
from safetensors.torch import save

from registry import auth
from registry.api import GenerateThrottle
from registry.auth import OnBehalfAuthentication
from registry.models import ApiKey, BaseModel, Expert

from . import service
from .models import Usage
from .serializers import (
    AttachSerializer,
    ChatCompletionSerializer,
    CompletionSerializer,
    GenerateSerializer,
    UsageSerializer,
)


class ModelNotFound(NotFound):
    """No such base model, or no such expert for this caller (404; OpenAI's clients read the
    code ``model_not_found``)."""

    default_code = "model_not_found"


class Busy(APIException):
    """No room for the request now: 503 with Retry-After (DRF sends ``wait`` as that header)."""

    status_code = 503
    default_code = "overloaded"

    def __init__(self, detail, wait):
        super().__init__(detail)
        self.wait = wait


@contextlib.contextmanager
def service_errors():
    """The router's refusals as HTTP errors: an unknown base model or expert 404, bad request
    400, no room now 503, a failure while generating 500."""
    try:
        yield
    except service.UnknownModel as exc:
        raise ModelNotFound(str(exc)) from None
    except service.BadRequest as exc:
        raise ValidationError({"detail": str(exc)}) from None
    except service.Overloaded as exc:
        raise Busy(f"the server is busy: {exc}", exc.retry_after_s) from None
    except service.GenerationFailed as exc:
        raise APIException(str(exc)) from None


class RouterView(AsyncAPIView):
    """Generation is not a write: read-only API keys may use it; callers with no account only
    where LATENTRY_ANONYMOUS_GENERATION allows them (``auth.MayGenerate``).

    Async (adrf): a request waiting for the engine holds no thread, so one serving process
    holds hundreds of open streams. Whatever touches the database runs in a thread
    (``sync_to_async``)."""

    authentication_classes = [
        *api_settings.DEFAULT_AUTHENTICATION_CLASSES,
        OnBehalfAuthentication,  # "try it" from a web process
    ]
    permission_classes = [auth.MayGenerate]
    throttle_classes = [GenerateThrottle]

    async def admit(self, ask):
        """The request planned and queued in the engine, within the caller's fair use (a
        user across all their keys). Every refusal (4xx, 429, 503) comes from here."""
        key = self.request.auth if isinstance(self.request.auth, ApiKey) else None
        with service_errors():
            return await service.admit(
                ask, self.request.user, caller=auth.caller(self.request), api_key=key
            )

    async def serve(self, ask):
        pending = await self.admit(ask)
        with service_errors():
            return await pending.answer_async()


class GenerateView(RouterView):
    @extend_schema(request=GenerateSerializer, responses=GenerateSerializer.Answer)
    async def post(self, request):
        data = validated(GenerateSerializer, request.data)
        answer = await self.serve(service.Ask(**data))
        return Response(answer_json(answer))


def answer_json(answer):
    return {
        "text": answer.text,
        "expert": answer.expert,
        "augmented": answer.augmented,
        "reason": answer.reason,
        "score": answer.score,
        "finish_reason": answer.finish_reason,
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "timings_ms": {k: round(v, 2) for k, v in answer.timings_ms.items()},
    }


class AttachView(RouterView):
    @extend_schema(request=AttachSerializer, responses=AttachSerializer.Answer)
    async def post(self, request):
        ask = service.Ask(**validated(AttachSerializer, request.data))
        with service_errors():  # database, then one short pass of D: in a thread
            choice, tensors, ids = await sync_to_async(service.attach)(ask, request.user)
        body = {
            "expert": choice.name if tensors else None,
            "augmented": tensors is not None,
            "reason": "" if tensors else choice.reason,
            "score": choice.score,
            "prompt_tokens": len(ids),
            "insert_before": len(ids) - 1,
            "position": len(ids) - 1,
        }
        if tensors is not None:
            offset = tensors["prefix.keys"].shape[2] if "prefix.keys" in tensors else 0
            body["prefix_positions"] = offset
            body["position"] += offset  # the prompt's positions start after a static prefix
            if "latents" in tensors:
                body["shape"] = list(tensors["latents"].shape)
            body["safetensors_base64"] = base64.b64encode(save(tensors)).decode()
        return Response(body)


class UsageView(generics.ListAPIView):
    """Your generation usage per API key and day."""

    serializer_class = UsageSerializer
    permission_classes = [IsAuthenticated]

    def get_queryset(self):
        return Usage.objects.filter(api_key__user=self.request.user).select_related("api_key")


def validated(serializer_class, data):
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


# --- OpenAI-compatible ------------------------------------------------------------------------


class ModelsView(APIView):
    """Base models, their ``auto`` router, and every expert you may list, as OpenAI models."""

    permission_classes = [AllowAny]

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request):
        created = int(time.time())
        data = []
        for base in BaseModel.objects.exclude(weights_location="").order_by("slug"):
            data.append(model_entry(base.slug, "latentry", created))
            data.append(model_entry(f"{base.slug}:auto", "latentry", created))
        experts = (
            Expert.objects.listed_for(request.user)
            .with_ready_version()
            .exclude(base_model__weights_location="")
            .select_related("owner", "base_model")
            .order_by("base_model__slug", "owner__username", "name")
        )
        for expert in experts:
            model_id = f"{expert.base_model.slug}:{expert.full_name}"
            data.append(model_entry(model_id, expert.owner.username, created))
        return Response({"object": "list", "data": data})


def model_entry(model_id, owner, created):
    return {"id": model_id, "object": "model", "created": created, "owned_by": owner}


ERROR_TYPES = {
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class OpenAIView(RouterView):
    chat = False
    serializer_class = None

    def handle_exception(self, exc):
        """Errors in OpenAI's shape, which its clients read the message from."""
        response = super().handle_exception(exc)
        if response is not None and response.status_code >= 400:
            error = {
                "message": error_message(response.data),
                "type": ERROR_TYPES.get(response.status_code, "invalid_request_error"),
                "param": None,
                "code": response.status_code,
            }
            if isinstance(exc, ModelNotFound):  # what OpenAI answers for a model it lacks
                error.update(type="invalid_request_error", param="model", code="model_not_found")
            response.data = {"error": error}
        return response

    async def post(self, request):
        data = validated(self.serializer_class, request.data)
        base, expert = service.parse_model(data.pop("model"))
        stream = data.pop("stream")
        ask = service.Ask(base=base, expert=expert, **data)
        completion_id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if stream:
            return await self.stream(ask, completion_id, base)
        answer = await self.serve(ask)
        return Response(self.completion(answer, completion_id, base))

    def completion(self, answer, completion_id, base):
        choice = {"index": 0, "finish_reason": answer.finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": answer.text}
        else:
            choice["text"] = answer.text
        return {
            "id": completion_id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": model_name(base, answer.expert),
            "choices": [choice],
            "usage": {
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                "total_tokens": answer.prompt_tokens + answer.completion_tokens,
            },
            "latentry": latentry_fields(answer),
        }

    async def stream(self, ask, completion_id, base):
        """Server-sent events of ``Pending.events``: a chunk per piece of text, then one with
        the finish reason. Refusals (4xx, 429, and 503 while it waits for a place in the
        engine) come before the stream starts; a failure after it, as an error event. Chunks
        name the model chosen when the stream started until a plain retry, then the base;
        the last one what answered."""
        pending = await self.admit(ask)
        with service_errors():
            await pending.admitted()
        chunk = ChunkWriter(self.chat, completion_id, base, pending)

        async def events():
            try:
                if self.chat:
                    yield chunk.text({"role": "assistant", "content": ""})
                try:
                    async for event in pending.events():
                        if isinstance(event, service.Retry):
                            chunk.expert = None  # the plain model answers from here on
                        elif isinstance(event, service.Answer):
                            yield chunk.last(event)
                        else:
                            yield chunk.text({"content": event})
                except (service.GenerationFailed, service.Overloaded) as exc:
                    error = {"message": str(exc), "type": "server_error"}  # the stream began
                    yield f"data: {json.dumps({'error': error})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                await pending.close()  # also when the server ends the stream: the client left

        response = StreamingHttpResponse(events(), content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # proxies must not hold the stream back
        return response


class ChunkWriter:
    """OpenAI's stream chunks for one completion."""

    def __init__(self, chat, completion_id, base, pending):
        self.chat, self.id, self.base = chat, completion_id, base
        self.created = int(time.time())
        self.expert = pending.choice.name if pending.request.expert is not None else None

    def text(self, delta):
        return self._chunk(delta, None, self.expert)

    def last(self, answer):
        return self._chunk({}, answer.finish_reason, answer.expert, latentry_fields(answer))

    def _chunk(self, delta, finish_reason, expert, latentry=None):
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta.get("content", "")
        body = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": model_name(self.base, expert),
            "choices": [choice],
        }
        if latentry is not None:  # the last chunk
            body["latentry"] = latentry
        return f"data: {json.dumps(body)}\n\n"


def error_message(data):
    """One readable line from DRF's error data: {"field": ["problem"]} -> "field: problem"."""
    if isinstance(data, dict):
        if set(data) == {"detail"}:
            return error_message(data["detail"])
        return "; ".join(f"{key}: {error_message(value)}" for key, value in data.items())
    if isinstance(data, list):
        return " ".join(error_message(item) for item in data)
    return str(data)


def model_name(base, expert_name):
    """The ``model`` a response names: what answered (``<base>:<owner>/<name>@<n>``), or the
    base alone when no expert did (none asked for, none chosen by auto, or one dropped)."""
    return f"{base}:{expert_name}" if expert_name else base


def latentry_fields(answer):
    body = answer_json(answer)
    return {k: body[k] for k in ("expert", "augmented", "reason", "score", "timings_ms")}


# OpenAI's shapes; with ``stream: true``, server-sent events of the same chunks.
OPENAI_ANSWERS = {
    (200, "application/json"): OpenApiTypes.OBJECT,
    (200, "text/event-stream"): OpenApiTypes.STR,
}


class CompletionsView(OpenAIView):
    chat = False
    serializer_class = CompletionSerializer

    @extend_schema(request=CompletionSerializer, responses=OPENAI_ANSWERS)
    async def post(self, request):
        return await super().post(request)


class ChatCompletionsView(OpenAIView):
    chat = True
    serializer_class = ChatCompletionSerializer

    @extend_schema(request=ChatCompletionSerializer, responses=OPENAI_ANSWERS)
    async def post(self, request):
        return await super().post(request)
