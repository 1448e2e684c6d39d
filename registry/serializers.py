from django.conf import settings
from django.urls import reverse
from rest_framework import serializers

from coprocessor import bounded_json

from .api import SlugField, StrictModelSerializer, StrictSerializer
from .models import (
    AliasMove,
    ApiKey,
    BaseModel,
    Domain,
    Expert,
    ExpertVersion,
    Review,
    VersionAlias,
    validate_tags,
)
from .parsers import PayloadTooLarge, parse_json
from .uploads import over_limit


class BaseModelSerializer(serializers.ModelSerializer):
    class Meta:
        model = BaseModel
        fields = [
            "slug",
            "source",
            "revision",
            "architecture",
            "hidden_size",
            "num_layers",
            "vocab_size",
            "context_length",
            "fingerprint",
            "created_at",
        ]


class DomainSerializer(serializers.ModelSerializer):
    parent = SlugField(slug_field="slug", read_only=True, allow_null=True)

    class Meta:
        model = Domain
        fields = ["slug", "name", "description", "parent"]


class ExpertSerializer(StrictModelSerializer):
    id = serializers.CharField(source="full_name", read_only=True)
    owner = serializers.CharField(source="owner.username", read_only=True)
    domain = SlugField(slug_field="slug", queryset=Domain.objects.all())
    base_model = SlugField(slug_field="slug", queryset=BaseModel.objects.all())
    tags = serializers.ListField(
        child=serializers.CharField(), required=False, validators=[validate_tags]
    )
    latest_version = serializers.IntegerField(read_only=True, default=None)
    url = serializers.SerializerMethodField()

    class Meta:
        model = Expert
        fields = [
            "id",
            "owner",
            "name",
            "title",
            "summary",
            "model_card",
            "domain",
            "base_model",
            "visibility",
            "license",
            "tags",
            "download_count",
            "rating",
            "review_count",
            "measured_gain",
            "gain_source",
            "latest_version",
            "created_at",
            "updated_at",
            "url",
        ]
        read_only_fields = [
            "download_count",
            "rating",
            "review_count",
            "measured_gain",
            "gain_source",
        ]

    def get_url(self, expert) -> str:
        return expert.get_api_url()

    def validate_name(self, name):
        if self.instance is not None and name != self.instance.name:
            raise serializers.ValidationError("an expert cannot be renamed")
        return name

    def validate_base_model(self, base_model):
        if self.instance is not None and base_model != self.instance.base_model:
            raise serializers.ValidationError("the base model of an expert cannot change")
        return base_model

    def create(self, validated_data):
        return Expert.create_for(**validated_data)


class ExpertVersionSerializer(serializers.ModelSerializer):
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = ExpertVersion
        fields = [
            "number",
            "status",
            "status_reason",
            "kind",
            "n_latents",
            "prefix_positions",
            "sha256",
            "size",
            "config",
            "metrics",
            "claimed_metrics",
            "changelog",
            "download_count",
            "benchmark_gain",
            "off_domain_change",
            "latency_ratio",
            "benchmarked_at",
            "created_at",
            "download_url",
        ]
        read_only_fields = fields

    def get_download_url(self, version) -> str:
        expert = version.expert
        return reverse(
            "api:version-download", args=[expert.owner.username, expert.name, version.number]
        )


class VersionUploadSerializer(StrictSerializer):
    file = serializers.FileField(help_text="the expert's .safetensors file")
    number = serializers.IntegerField(min_value=1, max_value=1_000_000, required=False)
    changelog = serializers.CharField(max_length=5000, required=False, allow_blank=True)
    claimed_metrics = serializers.CharField(
        required=False, help_text="JSON object of the publisher's own measurements"
    )

    def validate_file(self, upload):
        limit = settings.LATENTRY_MAX_ARTIFACT_BYTES
        if over_limit(upload, limit):
            raise PayloadTooLarge(f"file is over the limit of {limit} bytes")
        return upload

    def validate_claimed_metrics(self, value):
        try:
            metrics = parse_json(value)
        except bounded_json.Refused as exc:
            raise serializers.ValidationError(str(exc)) from None
        except ValueError:
            raise serializers.ValidationError("must be a JSON object") from None
        if not isinstance(metrics, dict):
            raise serializers.ValidationError("must be a JSON object")
        return metrics


class ReviewSerializer(StrictModelSerializer):
    user = serializers.CharField(source="user.username", read_only=True)

    class Meta:
        model = Review
        fields = ["id", "user", "stars", "text", "created_at", "updated_at"]
        extra_kwargs = {"stars": {"min_value": 1, "max_value": 5}}


class ApiKeySerializer(StrictModelSerializer):
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=ApiKey.SCOPES),
        min_length=1,
        max_length=2,
        default=lambda: [ApiKey.READ, ApiKey.WRITE],
    )

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "scopes", "created_at", "last_used_at", "revoked_at"]
        read_only_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]


class NewApiKeySerializer(ApiKeySerializer):
    """A key as its creation answers it: with the secret, which is never shown again."""

    key = serializers.CharField(read_only=True, help_text="the secret; shown only now")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]


class AliasSerializer(serializers.ModelSerializer):
    version = serializers.IntegerField(source="version.number", read_only=True)

    class Meta:
        model = VersionAlias
        fields = ["name", "version", "updated_at"]
        read_only_fields = fields


class AliasPointSerializer(StrictSerializer):
    version = serializers.IntegerField(min_value=1, help_text="the version number to point at")


class AliasMoveSerializer(serializers.ModelSerializer):
    from_version = serializers.IntegerField(source="from_number", read_only=True)
    to_version = serializers.IntegerField(source="to_number", read_only=True)
    moved_by = serializers.CharField(source="moved_by.username", read_only=True, default=None)

    class Meta:
        model = AliasMove
        fields = ["alias", "from_version", "to_version", "moved_by", "moved_at"]
        read_only_fields = fields
