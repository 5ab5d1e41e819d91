"""Services for `Document`, the tenant's retrievable text (searched by `retrieval` steps)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib.postgres.search import SearchVector
from django.core.exceptions import ValidationError
from django.db import transaction

from jobs.models import Document

if TYPE_CHECKING:
    from tenants.models import Tenant

TITLE_MAX_LENGTH = 300


def _search_vector() -> SearchVector:
    # Title words rank above body words (weights A and B of ts_rank).
    return SearchVector("title", weight="A", config="english") + SearchVector(
        "text", weight="B", config="english"
    )


def _validated(index: int, document: Any) -> dict[str, Any]:
    """The fields of one document, or ValidationError naming `documents[index].field`."""
    where = f"documents[{index}]"
    if not isinstance(document, dict):
        raise ValidationError(f"{where}: must be an object")
    unknown = set(document) - {"title", "text", "metadata"}
    if unknown:
        raise ValidationError(f"{where}: unknown fields {sorted(unknown)}")
    title = document.get("title") or ""
    text = document.get("text")
    metadata = document.get("metadata") or {}
    if not isinstance(text, str) or not text.strip():
        raise ValidationError(f"{where}.text: required, a non-empty string")
    if not isinstance(title, str) or len(title) > TITLE_MAX_LENGTH:
        raise ValidationError(f"{where}.title: a string of at most {TITLE_MAX_LENGTH} characters")
    if not isinstance(metadata, dict):
        raise ValidationError(f"{where}.metadata: must be an object")
    # PostgreSQL text cannot hold NUL; refuse here rather than fail the whole batch in the DB.
    if "\x00" in text or "\x00" in title:
        raise ValidationError(f"{where}: contains a NUL character")
    return {"title": title, "text": text, "metadata": metadata}


def documents_add(*, tenant: Tenant, documents: list[dict[str, Any]]) -> list[Document]:
    """Store `documents` (each `{"text", "title"?, "metadata"?}`) for `tenant`, searchable.

    All or nothing: one transaction for the rows and their search vectors. The returned
    instances carry their ids but not the computed `search` value (refresh them if needed).
    """
    fields = [_validated(index, document) for index, document in enumerate(documents)]
    if not fields:
        return []
    with transaction.atomic():
        created = Document.objects.bulk_create(
            [Document(tenant=tenant, **document) for document in fields]
        )
        # One UPDATE over the new rows: the vector is computed by PostgreSQL from the stored
        # columns, so it always uses the same configuration as the query side.
        Document.objects.filter(pk__in=[document.pk for document in created]).update(
            search=_search_vector()
        )
    return created
