from django import forms

from registry import events

from .models import validate_url


class WebhookForm(forms.Form):
    url = forms.URLField(
        label="URL",
        max_length=500,
        assume_scheme="https",
        validators=[validate_url],
        help_text="receives a signed POST (JSON) for each event",
    )
    events = forms.MultipleChoiceField(
        choices=[(name, name) for name in events.EVENTS],
        initial=list(events.EVENTS),
        widget=forms.CheckboxSelectMultiple,
    )
