"""Forms of the training pages: upload a dataset, start a training job."""

from django import forms

from registry.models import BaseModel, Domain, slug_validator

from .models import Dataset
from .serializers import DEFAULTS, TrainingParamsSerializer


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
    time_budget_minutes = forms.FloatField(
        min_value=0.05, initial=10, help_text="training stops after this long (or the steps)"
    )
    steps = forms.IntegerField(min_value=1, initial=DEFAULTS.steps)
    n_latents = forms.IntegerField(min_value=1, initial=DEFAULTS.n_latents)
    lora_rank = forms.IntegerField(min_value=1, initial=DEFAULTS.lora_rank)
    window = forms.IntegerField(min_value=32, initial=DEFAULTS.window)
    ahead_tokens = forms.IntegerField(min_value=1, initial=DEFAULTS.ahead_tokens)
    positions_per_window = forms.IntegerField(min_value=1, initial=DEFAULTS.positions_per_window)
    lr = forms.FloatField(initial=DEFAULTS.lr)

    def __init__(self, *args, user, expert, **kwargs):
        super().__init__(*args, **kwargs)
        self.expert = expert
        self.fields["datasets"].queryset = Dataset.objects.usable_by(user).select_related("owner")

    def clean_datasets(self):
        chosen = self.cleaned_data["datasets"]
        if len(chosen) > 20:  # as the API allows
            raise forms.ValidationError("choose at most 20 datasets")
        return chosen

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        params = {k: v for k, v in data.items() if k not in ("datasets", "time_budget_minutes")}
        params["time_budget_s"] = data["time_budget_minutes"] * 60
        checked = TrainingParamsSerializer(data=params)
        if not checked.is_valid():
            for field, errors in checked.errors.items():
                field = "time_budget_minutes" if field == "time_budget_s" else field
                for error in errors:
                    self.add_error(field if field in self.fields else None, str(error))
            return data
        params = dict(checked.validated_data)
        context = self.expert.base_model.context_length
        if params["window"] > context:
            self.add_error("window", f"must be at most the base model's context ({context})")
        data["params"] = params
        return data
