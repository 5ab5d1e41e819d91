"""`retrieval` steps: PostgreSQL full-text search over the tenant's own documents."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from jobs.models import Document
from jobs.services.documents import documents_add
from jobs.steps import retrieval
from jobs.steps.registry import StepContext

pytestmark = pytest.mark.django_db


def search(tenant, query: str, **fields) -> dict:
    ctx = StepContext(
        run_id=str(uuid.uuid4()),
        tenant_id=tenant.pk,
        step_id="search",
        map_index=None,
        kind="retrieval",
        attempt=1,
        input={"query": query, **fields},
        idempotency_key="run:search",
        deadline=timezone.now() + timedelta(seconds=10),
    )
    return retrieval.handle(ctx)


def titles(result: dict) -> list[str]:
    return [document["title"] for document in result["documents"]]


@pytest.fixture
def library(owner):
    return documents_add(
        tenant=owner.tenant,
        documents=[
            {
                "title": "Refund policy",
                "text": "Customers can ask for a refund within 30 days. Refunds go to the card.",
                "metadata": {"source": "handbook", "page": 4},
            },
            {
                "title": "Shipping times",
                "text": "Orders ship in two days. A late order can be refunded on request.",
            },
            {"title": "Password reset", "text": "Reset a password from the login page."},
        ],
    )


def test_the_best_matching_document_comes_first(owner, library):
    result = search(owner.tenant, "refund")

    assert result["query"] == "refund"
    assert titles(result) == ["Refund policy", "Shipping times"]
    best = result["documents"][0]
    assert best["id"] == str(library[0].public_id)
    assert best["text"].startswith("Customers can ask for a refund")
    assert best["metadata"] == {"source": "handbook", "page": 4}
    assert best["score"] > result["documents"][1]["score"] > 0
    assert best["score"] == round(best["score"], 4)


def test_any_word_matches_by_default_and_the_best_match_ranks_first(owner, library):
    found = titles(search(owner.tenant, "I want a refund for my order"))
    assert found[0] == "Refund policy"
    assert titles(search(owner.tenant, "I want a refund for my order", match="all")) == []


def test_websearch_syntax_is_understood_with_match_all(owner, library):
    assert titles(search(owner.tenant, "refund -card", match="all")) == ["Shipping times"]
    either = search(owner.tenant, '"login page" or shipping', match="all")
    assert sorted(titles(either)) == ["Password reset", "Shipping times"]


def test_another_tenants_documents_are_never_returned(owner, outsider, library):
    documents_add(
        tenant=outsider.tenant,
        documents=[{"title": "Refund refund refund", "text": "The outsider's refund notes."}],
    )

    assert titles(search(owner.tenant, "refund")) == ["Refund policy", "Shipping times"]
    assert titles(search(outsider.tenant, "refund")) == ["Refund refund refund"]
    assert titles(search(outsider.tenant, "password")) == []


def test_top_k_limits_the_results(owner):
    documents_add(
        tenant=owner.tenant,
        documents=[{"title": f"Invoice {n}", "text": "An invoice question."} for n in range(8)],
    )

    assert len(search(owner.tenant, "invoice")["documents"]) == retrieval.DEFAULT_TOP_K
    assert len(search(owner.tenant, "invoice", top_k=2)["documents"]) == 2


def test_a_query_that_matches_nothing_returns_no_documents(owner, library):
    assert search(owner.tenant, "kangaroo")["documents"] == []
    assert search(owner.tenant, "the")["documents"] == []  # only a stop word
    assert search(owner.tenant, "  ")["documents"] == []


def test_documents_add_stores_searchable_documents_in_one_go(owner):
    created = documents_add(
        tenant=owner.tenant, documents=[{"text": "Untitled but searchable onboarding notes."}]
    )

    [stored] = Document.objects.filter(tenant=owner.tenant)
    assert stored.public_id == created[0].public_id
    assert stored.title == ""
    assert stored.metadata == {}
    assert stored.search is not None
    assert titles(search(owner.tenant, "onboarding")) == [""]


def test_documents_add_stores_nothing_when_one_document_is_invalid(owner):
    with pytest.raises(ValidationError, match=r"documents\[1\]\.text"):
        documents_add(tenant=owner.tenant, documents=[{"text": "fine"}, {"title": "no text"}])

    assert not Document.objects.filter(tenant=owner.tenant).exists()
