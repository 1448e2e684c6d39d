"""Forms of the training pages: upload a dataset, start a training job."""

from django import forms
from rest_framework import serializers

from registry.models import BaseModel, Domain, Expert, slug_validator

from .models import Dataset, TrainingJob
from .serializers import TrainingParamsSerializer

# The parameters the training page offers (the rest keep their defaults); their bounds,
# defaults and help come from the API's serializer, so the two cannot disagree.
PAGE_PARAMS = (
    "steps",
    "n_latents",
    "prefix_positions",
    "objective",
    "lora_rank",
    "window",
    "ahead_tokens",
    "positions_per_window",
    "lr",
)


class DatasetForm(forms.Form):
    name = forms.CharField(max_length=100, validators=[slug_validator])
    file = forms.FileField(help_text="UTF-8 text (documents split by blank lines), or .jsonl")
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    domain = forms.ModelChoiceField(Domain.objects.all(), required=False, to_field_name="slug")
    base_model = forms.ModelChoiceField(
        BaseModel.objects.all(),
        required=False,
        to_field_name="slug",
        help_text="count tokens with this base model's tokenizer",
    )
    public = forms.BooleanField(required=False, help_text="others may train on it")


class TrainingForm(forms.Form):
    """The settings most runs change; the rest keep TrainConfig's defaults. Checked by the
    same serializer as the API's params."""

    datasets = forms.ModelMultipleChoiceField(
        Dataset.objects.none(), widget=forms.CheckboxSelectMultiple
    )
    visibility = forms.ChoiceField(
        choices=[
            ("", "Private if a dataset is private, else as it is"),
            *Expert.VISIBILITY_CHOICES,
        ],
        required=False,
        help_text="the expert's visibility once the job publishes its new version",
    )
    time_budget_minutes = forms.FloatField(
        min_value=0.05, initial=10, help_text="training stops after this long (or the steps)"
    )

    def __init__(self, *args, expert, **kwargs):
        super().__init__(*args, **kwargs)
        self.expert = expert
        readable = Dataset.objects.readable_by(expert.owner)
        self.fields["datasets"].queryset = readable.select_related("owner")
        params = TrainingParamsSerializer().fields
        for name in PAGE_PARAMS:
            self.fields[name] = form_field(params[name])

    def clean_datasets(self):
        TrainingJob.check_datasets(self.cleaned_data["datasets"])
        return self.cleaned_data["datasets"]

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        form_only = ("datasets", "visibility", "time_budget_minutes")
        params = {k: v for k, v in data.items() if k not in form_only and v not in (None, "")}
        params["time_budget_s"] = data["time_budget_minutes"] * 60
        checked = TrainingParamsSerializer(data=params)
        if not checked.is_valid():
            for field, errors in checked.errors.items():
                field = "time_budget_minutes" if field == "time_budget_s" else field
                for error in errors:
                    self.add_error(field if field in self.fields else None, str(error))
            return data
        data["params"] = params = dict(checked.validated_data)
        try:
            TrainingJob.check_window(self.expert.base_model, TrainingJob.span(params))
        except forms.ValidationError as exc:
            self.add_error("window", exc)
        return data


def form_field(field):
    """The form field for a serializer field of the training parameters: the same bounds,
    default and help; left empty, the serializer's default applies."""
    common = dict(required=False, help_text=field.help_text or "")
    if field.default is not serializers.empty:
        common["initial"] = field.default
    if isinstance(field, serializers.ChoiceField):
        choices = [(name, name.replace("_", "-")) for name in field.choices]
        return forms.ChoiceField(choices=choices, **common)
    bounds = dict(min_value=field.min_value, max_value=field.max_value)
    if isinstance(field, serializers.IntegerField):
        return forms.IntegerField(**bounds, **common)
    return forms.FloatField(**bounds, **common)
