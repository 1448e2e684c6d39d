from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from registry.api import StrictSerializer

from .models import Usage

EXPERT_HELP = (
    '"owner/name", "owner/name@version", "owner/name@alias" (e.g. @stable), "auto", '
    'or empty for the plain base model; several to compose as a list or as "a/x+b/y"'
)


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "maxLength": 1000},
            {"type": "array", "items": {"type": "string", "maxLength": 200}, "minItems": 1},
        ]
    }
)
class ExpertField(serializers.Field):
    """One expert's name (or "auto", or ""), or a list of names to compose, which the service
    reads as ``a/x+b/y`` (``inference.choose.composed`` bounds how many)."""

    default_error_messages = {
        "invalid": 'an expert name ("owner/name[@version or alias]", "auto" or "") or a list '
        "of expert names to compose",
    }

    def to_internal_value(self, data):
        if isinstance(data, str) and len(data) <= 1000:
            return data.strip()
        names = data if isinstance(data, list) else None
        if not names or not all(
            isinstance(n, str) and 0 < len(n.strip()) <= 200 and "+" not in n for n in names
        ):
            self.fail("invalid")
        return "+".join(n.strip() for n in names)

    def to_representation(self, value):
        return value


def check_sampling(attrs):
    """Refuse settings that would make sampling divide by ~0 or keep no token."""
    temperature = attrs.get("temperature", 0.0)
    if 0 < temperature < 1e-3:
        raise serializers.ValidationError({"temperature": ["use 0 (greedy) or at least 0.001"]})
    if attrs.get("top_p", 1.0) <= 0:
        raise serializers.ValidationError({"top_p": ["must be above 0"]})
    return attrs


class SamplingFields(StrictSerializer):
    temperature = serializers.FloatField(min_value=0.0, max_value=5.0, default=0.0)
    top_p = serializers.FloatField(min_value=0.0, max_value=1.0, default=1.0)
    seed = serializers.IntegerField(min_value=0, max_value=2**63 - 1, required=False, default=None)

    def validate(self, attrs):
        return check_sampling(super().validate(attrs))

    stop = serializers.ListField(
        child=serializers.CharField(max_length=100), max_length=8, default=list
    )


class PromptFields(serializers.Serializer):
    prompt = serializers.CharField(required=False, max_length=100_000, trim_whitespace=False)
    messages = serializers.ListField(child=serializers.DictField(), required=False, max_length=256)

    def validate(self, attrs):
        attrs = super().validate(attrs)
        if ("prompt" in attrs) == ("messages" in attrs):
            raise serializers.ValidationError("give exactly one of prompt or messages")
        for message in attrs.get("messages", []):
            if message.get("role") not in ("system", "user", "assistant"):
                raise serializers.ValidationError(
                    {"messages": ["each message needs a role: system, user or assistant"]}
                )
            if not isinstance(message.get("content"), str):
                raise serializers.ValidationError(
                    {"messages": ["each message needs a string content"]}
                )
        return attrs


class GenerateSerializer(PromptFields, SamplingFields):
    base = serializers.SlugField(help_text="base model slug")
    expert = ExpertField(required=False, default="", help_text=EXPERT_HELP)
    max_new_tokens = serializers.IntegerField(min_value=1, default=64)

    class Answer(serializers.Serializer):
        class Meta:
            ref_name = "GenerateAnswer"

        text = serializers.CharField()
        expert = serializers.CharField(
            allow_null=True, help_text='owner/name@version used ("a/x@1+b/y@3" composed)'
        )
        augmented = serializers.BooleanField()
        reason = serializers.CharField(help_text="why no expert was used, if none was")
        score = serializers.FloatField(allow_null=True, help_text="auto routing similarity")
        finish_reason = serializers.CharField()
        prompt_tokens = serializers.IntegerField()
        completion_tokens = serializers.IntegerField()
        timings_ms = serializers.DictField(child=serializers.FloatField())


class AttachSerializer(PromptFields, StrictSerializer):
    base = serializers.SlugField()
    expert = ExpertField(help_text=EXPERT_HELP)

    class Answer(serializers.Serializer):
        class Meta:
            ref_name = "AttachAnswer"

        expert = serializers.CharField(allow_null=True)
        augmented = serializers.BooleanField()
        reason = serializers.CharField()
        score = serializers.FloatField(allow_null=True)
        prompt_tokens = serializers.IntegerField()
        insert_before = serializers.IntegerField(help_text="index of the prompt token")
        position = serializers.IntegerField(
            help_text="position id of the prompt's last token, which the latents share"
        )
        prefix_positions = serializers.IntegerField(
            required=False, help_text="P: the static prefix's length; the prompt starts at P"
        )
        shape = serializers.ListField(
            child=serializers.IntegerField(), required=False, help_text="the latents' (L, H)"
        )
        safetensors_base64 = serializers.CharField(
            required=False,
            help_text=(
                "safetensors with latents (L, H) and gate_bias (L,) for a coprocessor, and "
                "prefix.keys / prefix.values (layers, kv_heads, P, head_dim) and "
                "prefix.gate_bias (P,) for a static prefix"
            ),
        )


@extend_schema_field(
    {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]}
)
class StopField(serializers.Field):
    """OpenAI's ``stop``: a string or a list of up to 4 strings."""

    def to_internal_value(self, data):
        stops = [data] if isinstance(data, str) else data
        if (
            not isinstance(stops, list)
            or len(stops) > 4
            or not all(isinstance(s, str) and 0 < len(s) <= 100 for s in stops)
        ):
            raise serializers.ValidationError("a string or a list of up to 4 strings")
        return stops

    def to_representation(self, value):
        return value


class OpenAIFields(StrictSerializer):
    model = serializers.CharField(
        help_text="<base>, <base>:auto, <base>:<owner>/<name>[@n] or <base>:<a/x>+<b/y>"
    )
    max_tokens = serializers.IntegerField(min_value=1, default=16, source="max_new_tokens")
    max_completion_tokens = serializers.IntegerField(min_value=1, required=False)
    temperature = serializers.FloatField(min_value=0.0, max_value=2.0, default=1.0)
    top_p = serializers.FloatField(min_value=0.0, max_value=1.0, default=1.0)
    seed = serializers.IntegerField(min_value=0, max_value=2**63 - 1, required=False, default=None)
    stop = StopField(required=False, default=list)
    stream = serializers.BooleanField(default=False)
    n = serializers.IntegerField(min_value=1, max_value=1, required=False)
    user = serializers.CharField(required=False, max_length=256)
    stream_options = serializers.DictField(required=False)

    def validate(self, attrs):
        attrs = super().validate(attrs)
        if "max_completion_tokens" in attrs:
            attrs["max_new_tokens"] = attrs.pop("max_completion_tokens")
        for ignored in ("n", "user", "stream_options"):
            attrs.pop(ignored, None)
        return check_sampling(attrs)


class CompletionSerializer(OpenAIFields):
    prompt = serializers.CharField(max_length=100_000, trim_whitespace=False)


class ChatCompletionSerializer(PromptFields, OpenAIFields):
    messages = serializers.ListField(child=serializers.DictField(), min_length=1, max_length=256)


class UsageSerializer(serializers.ModelSerializer):
    api_key = serializers.CharField(source="api_key.name")
    prefix = serializers.CharField(source="api_key.prefix")

    class Meta:
        model = Usage
        fields = ["api_key", "prefix", "day", "requests", "prompt_tokens", "completion_tokens"]
