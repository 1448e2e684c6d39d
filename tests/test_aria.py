"""Every aria-describedby on a form points at an element of the page (Django renders it for a
field with help text, naming <id>_helptext)."""

import re

import pytest
from django.test import Client

from tests.factories import logged_in


def dangling_references(html):
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    referenced = {
        name for value in re.findall(r'aria-describedby="([^"]+)"', html) for name in value.split()
    }
    return referenced - ids, referenced


@pytest.mark.parametrize("path", ["/accounts/signup/", "/accounts/login/"])
def test_signed_out_forms_describe_their_fields_with_elements_that_exist(db, path):
    missing, referenced = dangling_references(Client().get(path).content.decode())
    assert not missing
    if path.endswith("signup/"):
        assert referenced  # the password's rules, at least


@pytest.mark.parametrize("path", ["/datasets/", "/experts/new/", "/experts/alice/pydoc/train/"])
def test_signed_in_forms_describe_their_fields_with_elements_that_exist(alice, make_expert, path):
    make_expert("pydoc")
    missing, _ = dangling_references(logged_in(alice).get(path).content.decode())
    assert not missing
