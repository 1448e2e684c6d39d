"""Reviews: one per user and expert (a second one edits the first, in the API as on the
pages), 1-5 stars, never by the owner, and the expert's rating follows them."""

import pytest

from registry.models import Expert
from tests.factories import client_for

pytestmark = pytest.mark.django_db


def rating(expert):
    expert.refresh_from_db()
    return expert.rating, expert.review_count


def test_a_user_reviews_once_and_the_rating_follows(bob, sam, make_expert):
    expert = make_expert()
    url = "/api/v1/experts/alice/pydoc/reviews/"
    first = client_for(bob).post(url, {"stars": 4, "text": "useful"})
    assert first.status_code == 201
    assert first.json()["user"] == "bob"
    assert client_for(sam).post(url, {"stars": 2}).status_code == 201
    assert rating(expert) == (3.0, 2)
    review_url = f"{url}{first.json()['id']}/"
    assert client_for(bob).patch(review_url, {"stars": 5}).status_code == 200
    assert rating(expert) == (3.5, 2)
    assert client_for(sam).patch(review_url, {"stars": 1}).status_code == 403
    assert client_for(bob).delete(review_url).status_code == 204
    assert rating(expert) == (2.0, 1)


@pytest.mark.parametrize("stars", [0, 6, "five", None])
def test_stars_are_1_to_5(bob_client, make_expert, stars):
    expert = make_expert()
    response = bob_client.post(
        "/api/v1/experts/alice/pydoc/reviews/", {"stars": stars}, format="json"
    )
    assert response.status_code == 400
    assert "stars" in response.json()
    assert rating(expert) == (None, 0)


def test_a_second_review_edits_the_first(bob_client, make_expert):
    expert = make_expert()
    url = "/api/v1/experts/alice/pydoc/reviews/"
    first = bob_client.post(url, {"stars": 4, "text": "useful"})
    again = bob_client.post(url, {"stars": 2, "text": "less so"})
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert list(expert.reviews.values_list("stars", "text")) == [(2, "less so")]
    assert rating(expert) == (2.0, 1)


def test_owners_cannot_review_their_own_expert(alice_client, make_expert):
    make_expert()
    response = alice_client.post("/api/v1/experts/alice/pydoc/reviews/", {"stars": 5})
    assert response.status_code == 403
    assert response.json()["detail"] == "you cannot review your own expert"


def test_private_experts_cannot_be_reviewed_by_others(bob_client, make_expert):
    make_expert("secret", visibility=Expert.PRIVATE)
    response = bob_client.post("/api/v1/experts/alice/secret/reviews/", {"stars": 5})
    assert response.status_code == 404
    assert bob_client.get("/api/v1/experts/alice/secret/reviews/").status_code == 404


def test_reviews_list_in_a_constant_number_of_queries(
    make_expert, django_user_model, anon_client, django_assert_num_queries
):
    expert = make_expert()
    for i in range(12):
        user = django_user_model.objects.create_user(f"user{i}")
        expert.reviews.create(user=user, stars=1 + i % 5)
    for page_size in (1, 12):
        with django_assert_num_queries(3):
            anon_client.get(f"/api/v1/experts/alice/pydoc/reviews/?page_size={page_size}")
