"""Forms of the training pages: upload a dataset, start a training job."""

from django import forms

from coprocessor.artifact import MAX_LATENTS, MAX_PREFIX_POSITIONS
from coprocessor.train import OBJECTIVES
from registry.models import BaseModel, Domain, Expert, slug_validator

from .models import Dataset, TrainingJob
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
    steps = forms.IntegerField(min_value=1, initial=DEFAULTS.steps)
    n_latents = forms.IntegerField(
        min_value=0,
        max_value=MAX_LATENTS,
        initial=DEFAULTS.expert.n_latents,
        help_text="the coprocessor's latents (0: none)",
    )
    prefix_positions = forms.IntegerField(
        min_value=0,
        max_value=MAX_PREFIX_POSITIONS,
        required=False,
        help_text="the static prefix's positions (0: none; empty: sized to the training text)",
    )
    objective = forms.ChoiceField(
        choices=[(name, name.replace("_", "-")) for name in OBJECTIVES],
        initial=DEFAULTS.objective,
        required=False,  # left out: the default
        help_text="next-token: the text's own next tokens; distill: the base model's "
        "predictions when it has read the text before each window; mix: half each",
    )
    lora_rank = forms.IntegerField(min_value=1, initial=DEFAULTS.expert.lora_rank)
    window = forms.IntegerField(min_value=32, initial=DEFAULTS.window)
    ahead_tokens = forms.IntegerField(min_value=1, initial=DEFAULTS.ahead_tokens)
    positions_per_window = forms.IntegerField(min_value=1, initial=DEFAULTS.positions_per_window)
    lr = forms.FloatField(initial=DEFAULTS.lr)

    def __init__(self, *args, expert, **kwargs):
        super().__init__(*args, **kwargs)
        self.expert = expert
        readable = Dataset.objects.readable_by(expert.owner)
        self.fields["datasets"].queryset = readable.select_related("owner")

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
