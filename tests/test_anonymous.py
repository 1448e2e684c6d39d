"""Generation for callers with no account is the operator's decision
(LATENTRY_ANONYMOUS_GENERATION): refused with 401 by default, on every way in; where allowed,
counted at its own rate per client address."""

import pytest
from django.test import Client

from tests.factories import bearer_client, client_for

GENERATE = "/api/v1/generate"
CHAT = "/v1/chat/completions"


@pytest.fixture
def anonymous():
    return client_for(None)


def generate(client):
    body = {"base": "tiny-llama", "prompt": "w5 w6", "max_new_tokens": 2}
    return client.post(GENERATE, body, format="json")


def chat(client):
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "w5"}], "max_tokens": 2}
    return client.post(CHAT, body, format="json")


def test_by_default_anonymous_generation_is_401_everywhere_and_says_how_to_get_in(
    anonymous, base_model, alice
):
    refused = generate(anonymous)
    assert refused.status_code == 401
    assert "send an API key" in refused.json()["detail"]
    refused = chat(anonymous)
    assert refused.status_code == 401
    error = refused.json()["error"]
    assert "LATENTRY_ANONYMOUS_GENERATION" in error["message"]
    assert anonymous.get("/v1/models").status_code == 200  # reading the catalog stays open
    assert generate(bearer_client(alice)).status_code == 200
    assert chat(client_for(alice)).status_code == 200


def test_the_try_page_asks_an_anonymous_visitor_to_sign_in(make_expert, publish, base_model):
    expert = make_expert("pydoc")
    publish(expert)
    response = Client().post(
        f"/experts/{expert.owner.username}/{expert.name}/try/",
        {"prompt": "w5 w6", "max_new_tokens": 2},
    )
    assert response.status_code == 401
    assert "Sign in to try experts" in response.content.decode()


def test_where_allowed_anonymous_callers_have_their_own_rate(
    settings, anonymous, base_model, alice
):
    settings.LATENTRY_ANONYMOUS_GENERATION = True
    settings.LATENTRY_THROTTLE_RATES = {
        **settings.LATENTRY_THROTTLE_RATES,
        "generate_anonymous": "2/min",
    }
    assert [generate(anonymous).status_code for _ in range(3)] == [200, 200, 429]
    assert generate(bearer_client(alice)).status_code == 200  # signed in: the usual rate
