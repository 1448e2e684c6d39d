"""Forms of the pages: sign up, experts, versions, reviews, API keys."""

from django import forms
from django.conf import settings
from django.contrib.auth.forms import UserCreationForm

from .models import ApiKey, BaseModel, Expert, Review, validate_alias_name, validate_tags
from .uploads import over_limit


class SignupForm(UserCreationForm):
    email = forms.EmailField(required=False, help_text="optional; for password resets")

    class Meta(UserCreationForm.Meta):
        fields = ["username", "email"]


class TagsField(forms.CharField):
    """Tags typed as "python, docs"; stored as a list."""

    default_validators = [validate_tags]

    def to_python(self, value):
        return [t.strip().lower() for t in (value or "").split(",") if t.strip()]

    def prepare_value(self, value):
        return ", ".join(value) if isinstance(value, list) else value


class ExpertForm(forms.ModelForm):
    tags = TagsField(required=False, help_text="comma-separated, e.g. python, docs")

    class Meta:
        model = Expert
        fields = [
            "name",
            "title",
            "summary",
            "domain",
            "base_model",
            "visibility",
            "license",
            "tags",
            "model_card",
        ]
        widgets = {
            "model_card": forms.Textarea(attrs={"rows": 14}),
            "summary": forms.TextInput(),
        }
        help_texts = {
            "name": "part of the address owner/name; lowercase letters, digits, '.', '_', '-'",
            "visibility": "public: listed; unlisted: anyone with the link; private: only you",
            "model_card": "Markdown. Scripts and unsafe links are removed when shown.",
        }

    def __init__(self, *args, owner=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.owner = owner
        if self.instance.pk:  # the address and the base model do not change once made
            del self.fields["name"]
            del self.fields["base_model"]
        else:
            self.fields["base_model"].initial = BaseModel.objects.order_by("created_at").first()

    def clean_name(self):
        name = self.cleaned_data["name"]
        Expert.check_name_free(self.owner, name)  # NameTaken is this field's error
        return name


class VersionUploadForm(forms.Form):
    file = forms.FileField(
        help_text="the expert's .safetensors file, as python -m coprocessor train writes it"
    )
    changelog = forms.CharField(required=False, max_length=5000, widget=forms.Textarea({"rows": 3}))

    def clean_file(self):
        upload = self.cleaned_data["file"]
        limit = settings.LATENTRY_MAX_ARTIFACT_BYTES
        if over_limit(upload, limit):
            raise forms.ValidationError(
                f"the file is over the limit of {limit} bytes", code="too_large"
            )
        return upload


class ReviewForm(forms.ModelForm):
    stars = forms.TypedChoiceField(
        choices=[(n, "★" * n) for n in range(5, 0, -1)], coerce=int, widget=forms.RadioSelect
    )

    class Meta:
        model = Review
        fields = ["stars", "text"]
        widgets = {"text": forms.Textarea(attrs={"rows": 3})}


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100)
    scopes = forms.MultipleChoiceField(
        choices=[(s, s) for s in ApiKey.SCOPES],
        initial=[ApiKey.READ, ApiKey.WRITE],
        widget=forms.CheckboxSelectMultiple,
        help_text="read: browse and generate; write: also upload, review and train",
    )


class AliasForm(forms.Form):
    """Point an alias at a version, or (no version) remove it."""

    alias = forms.CharField(max_length=40, validators=[validate_alias_name])
    version = forms.TypedChoiceField(coerce=int, required=False, empty_value=None)

    def __init__(self, *args, versions=(), **kwargs):
        super().__init__(*args, **kwargs)
        choices = [(v.number, f"v{v.number}") for v in versions]
        self.fields["version"].choices = [*choices, ("", "nothing: remove the alias")]
