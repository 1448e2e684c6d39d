from django.contrib import admin

from .models import ApiKey, BaseModel, Domain, Expert, ExpertVersion, Review


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    list_display = [
        "slug",
        "architecture",
        "hidden_size",
        "num_layers",
        "vocab_size",
        "short_fingerprint",
        "created_at",
    ]
    list_filter = ["architecture"]
    search_fields = ["slug", "source", "fingerprint"]
    readonly_fields = ["fingerprint", "param_shapes", "created_at"]

    @admin.display(description="fingerprint")
    def short_fingerprint(self, obj):
        return obj.fingerprint[:12]


@admin.register(Domain)
class DomainAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "parent"]
    search_fields = ["name", "slug", "description"]
    prepopulated_fields = {"slug": ["name"]}


class ExpertVersionInline(admin.TabularInline):
    model = ExpertVersion
    fields = [
        "number",
        "status",
        "status_reason",
        "kind",
        "n_latents",
        "prefix_positions",
        "size",
        "sha256",
        "download_count",
        "created_at",
    ]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True


@admin.register(Expert)
class ExpertAdmin(admin.ModelAdmin):
    list_display = [
        "__str__",
        "title",
        "domain",
        "base_model",
        "visibility",
        "download_count",
        "rating",
        "review_count",
        "measured_gain",
        "created_at",
    ]
    list_filter = ["visibility", "domain", "base_model", "license"]
    search_fields = ["name", "title", "summary", "owner__username"]
    list_select_related = ["owner", "domain", "base_model"]
    autocomplete_fields = ["owner"]
    readonly_fields = [
        "download_count",
        "rating",
        "review_count",
        "measured_gain",
        "created_at",
        "updated_at",
    ]
    inlines = [ExpertVersionInline]


@admin.register(ExpertVersion)
class ExpertVersionAdmin(admin.ModelAdmin):
    list_display = [
        "__str__",
        "expert",
        "number",
        "status",
        "kind",
        "n_latents",
        "prefix_positions",
        "size",
        "download_count",
        "created_at",
    ]
    list_filter = ["status", "kind"]
    search_fields = ["expert__name", "expert__owner__username", "sha256"]
    list_select_related = ["expert__owner"]
    readonly_fields = [
        "expert",
        "number",
        "artifact_key",
        "sha256",
        "size",
        "kind",
        "n_latents",
        "prefix_positions",
        "config",
        "download_count",
        "created_at",
    ]


@admin.register(Review)
class ReviewAdmin(admin.ModelAdmin):
    list_display = ["expert", "user", "stars", "created_at"]
    list_filter = ["stars"]
    search_fields = ["expert__name", "user__username", "text"]
    list_select_related = ["expert__owner", "user"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "name", "user", "scopes", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["prefix", "name", "user__username"]
    list_select_related = ["user"]
    readonly_fields = ["prefix", "secret_sha256", "created_at", "last_used_at"]
