"""The `retrieval` step kind: full-text search over the tenant's documents in PostgreSQL.

Ranking is PostgreSQL's `ts_rank` over the `search` vector that `documents_add` maintains
(title weighted above text). With `"match": "any"` (the default) a document matches when it
contains any word of the query and the rank orders them, which is what an agent's question
needs ("I want a refund for my invoice" should find the refund policy); `"match": "all"` uses
`websearch_to_tsquery`, so quoted phrases, `or` and `-excluded` words work as in a search
engine.
"""

from __future__ import annotations

import functools
import operator
import re
from typing import Any

from jobs.steps.registry import StepContext

DEFAULT_TOP_K = 5


def handle(ctx: StepContext) -> dict[str, Any]:
    # Imported here: the registry imports handlers lazily, and this one needs the app registry.
    from django.contrib.postgres.search import SearchQuery, SearchRank
    from django.db.models import F

    from jobs.models import Document

    query_text: str = ctx.input["query"]
    top_k: int = ctx.input.get("top_k") or DEFAULT_TOP_K
    if not query_text.strip():
        # A template that rendered to nothing: no search matches it, so skip the round trip.
        return {"query": query_text, "documents": []}

    if ctx.input.get("match", "any") == "all":
        query = SearchQuery(query_text, search_type="websearch", config="english")
    else:
        words = re.findall(r"\w+", query_text)[:64]
        if not words:
            return {"query": query_text, "documents": []}
        query = functools.reduce(
            operator.or_,
            [SearchQuery(word, search_type="plain", config="english") for word in words],
        )
    documents = (
        Document.objects.filter(tenant_id=ctx.tenant_id, search=query)
        .annotate(rank=SearchRank(F("search"), query))
        # The id breaks ties, so that equal ranks come back in a stable order.
        .order_by("-rank", "id")
        .only("public_id", "title", "text", "metadata")[:top_k]
    )
    return {
        "query": query_text,
        "documents": [
            {
                "id": str(document.public_id),
                "title": document.title,
                "text": document.text,
                "metadata": document.metadata,
                "score": round(float(document.rank), 4),
            }
            for document in documents
        ],
    }
