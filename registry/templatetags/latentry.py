"""Template filters of the pages: Markdown model cards (sanitised), stars, signed gains."""

import markdown as markdown_lib
import nh3
from django import template
from django.utils.html import format_html
from django.utils.safestring import mark_safe

register = template.Library()

# What a model card may contain once rendered: text formatting, code, tables, links and
# images over http(s). Everything else (script, style, event handlers, javascript: URLs,
# iframes, forms) is removed by nh3, whatever the Markdown produced.
CARD_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "code", "dd", "del", "div", "dl", "dt", "em",
    "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "li", "ol", "p", "pre", "span",
    "strong", "sub", "sup", "table", "tbody", "td", "th", "thead", "tr", "ul",
}  # fmt: skip
CARD_ATTRIBUTES = {"a": {"href", "title"}, "img": {"src", "alt", "title"}, "th": {"align"}}


@register.filter
def markdown(text):
    """A model card as safe HTML: Markdown rendered, then sanitised."""
    html = markdown_lib.markdown(text or "", extensions=["fenced_code", "tables"])
    return mark_safe(  # noqa: S308 - sanitised just above by nh3
        nh3.clean(
            html,
            tags=CARD_TAGS,
            attributes=CARD_ATTRIBUTES,
            url_schemes={"http", "https", "mailto"},
            link_rel="nofollow noopener noreferrer",
        )
    )


@register.filter
def stars(value):
    """★★★★☆ for 3.6 (rounded), with the number for screen readers."""
    if value is None:
        return mark_safe('<span class="muted">no reviews</span>')
    filled = max(0, min(5, round(float(value))))
    rating = f"{float(value):.1f}"
    return format_html(
        '<span class="stars" title="{0} of 5" aria-label="{0} of 5 stars">{1}{2}</span>',
        rating,
        "★" * filled,
        "☆" * (5 - filled),
    )


NOT_MEASURED = mark_safe('<span class="muted" title="not measured yet">—</span>')


def signed_percent(value, good_when_positive):
    """``value`` as a signed percentage, coloured by whether it is good news; a dash if None."""
    if value is None:
        return NOT_MEASURED
    css = "gain-up" if (value > 0) == good_when_positive else "gain-down"
    return format_html('<span class="{}">{}</span>', css, f"{float(value):+.2f}%")


@register.filter
def gain(value):
    """The platform-measured perplexity reduction, signed, or a dash when not measured."""
    return signed_percent(value, good_when_positive=True)


@register.filter
def gain_source(expert):
    """Where the catalog's figure comes from, for the reader: the domain's benchmark (the
    same text for every expert) or the owner's own data (not comparable between experts)."""
    labels = {"benchmark": "domain benchmark", "owner-data": "owner's data"}
    label = labels.get(expert.gain_source)
    return format_html('<span class="muted source">({})</span>', label) if label else ""


@register.filter
def change(value):
    """A signed perplexity change off the domain (positive: worse), or a dash."""
    return signed_percent(value, good_when_positive=False)


@register.filter
def overhead(ratio):
    """A latency ratio as the time it adds: 1.08 -> +8%."""
    if ratio is None:
        return NOT_MEASURED
    return f"{100 * (float(ratio) - 1):+.0f}%"
