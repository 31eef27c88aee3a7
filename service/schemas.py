"""Request and response bodies of the HTTP API (they make the OpenAPI schema at /docs).

Structure is checked here (types, list lengths); what depends on the model bundle
(feature names and kinds) and on the settings (k bounds, batch size) is checked when
the request is prepared (`service.engine`), with the same 422 answer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.query import integral_float_to_int
from service.settings import HARD_MAX_K

QUERY_EXAMPLE: dict[str, Any] = {
    "user_id": "196",
    "age_bucket": "45-49",
    "gender": "M",
    "occupation": "writer",
    "zip_prefix": "55",
    "history": ["242", "393", "381"],
}


class RetrieveRequest(BaseModel):
    """One retrieval: inline query features, a `user_id` from the feature store, or both."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"user_id": "196", "k": 1000, "exclude_seen": True},
                {"query": QUERY_EXAMPLE, "k": 100, "exclude_ids": ["50"]},
            ]
        },
    )

    query: dict[str, Any] | None = Field(
        default=None,
        description="Raw query-tower features keyed like the users.parquet columns (strings "
        "for categorical, lists for bags, numbers or null for dense) plus the history feature "
        "as a list of catalog item ids, MOST RECENT FIRST. Missing features count as null "
        "(unknown/missing); unknown feature names are refused (422). See /v1/info `schema`.",
    )
    user_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Look the user's features and history up in the feature store (when "
        "`query` is absent) and, with `exclude_seen`, their seen items.",
    )
    k: Annotated[int | None, BeforeValidator(integral_float_to_int)] = Field(
        default=None,
        strict=True,
        description=f"Number of results (default 1000; at most the server's max_k <= {HARD_MAX_K}).",
    )
    exclude_ids: list[str] = Field(
        default_factory=list, description="Catalog ids that must not be returned."
    )
    exclude_seen: bool = Field(
        default=False,
        strict=True,
        description="Also exclude the user's train+valid items (needs `user_id`).",
    )


class RetrieveResponse(BaseModel):
    """Best-first catalog ids with their scores (inner products of unit vectors)."""

    ids: list[str] = Field(description="Catalog item ids, best first (at most k).")
    scores: list[float] = Field(description="Score of each id, descending.")
    model_version: str = Field(description="The model bundle that embedded the query.")
    index_version: str = Field(description="The one index version that answered.")
    took_ms: float = Field(description="Server time for this request in milliseconds.")
    cached: bool = Field(default=False, description="Served from the response cache.")


class BatchRetrieveRequest(BaseModel):
    """Several retrievals in one call (at most the server's max_batch_queries)."""

    model_config = ConfigDict(extra="forbid")

    queries: list[RetrieveRequest] = Field(min_length=1, description="The retrievals, in order.")


class BatchRetrieveResponse(BaseModel):
    """One answer per query, in request order."""

    results: list[RetrieveResponse]
    took_ms: float


class EmbedRequest(BaseModel):
    """One query to embed: inline query features, a `user_id` from the feature store, or
    both, read exactly as /v1/retrieve reads them (no `k` or exclusions: nothing is
    searched)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_id": "196"}, {"query": QUERY_EXAMPLE}]},
    )

    query: dict[str, Any] | None = Field(
        default=None,
        description="Raw query-tower features, as in /v1/retrieve: keyed like the "
        "users.parquet columns plus the history feature (catalog item ids, MOST RECENT "
        "FIRST); missing features count as null, unknown names are refused (422). Takes "
        "precedence over `user_id`. See /v1/info `schema`.",
    )
    user_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Look the user's features and history up in the feature store (when "
        "`query` is absent); 404 when the user is not there.",
    )


class EmbedResponse(BaseModel):
    """The query embedding, as the query tower gives it to the index search."""

    embedding: list[float] = Field(
        description="The query embedding: `dim` float32 values (exact in JSON), unit L2 norm."
    )
    dim: int = Field(description="D, the embedding width (/v1/info `model.output_dim`).")
    model_version: str = Field(
        description="The model bundle that embedded the query (/v1/info `model.version`)."
    )
    index_version: str = Field(
        description="The index version serving when the query was embedded (/v1/info "
        "`index.version`); its item vectors come from the same model, so inner products "
        "with them are the scores /v1/retrieve ranks by."
    )
    normalized: Literal[True] = Field(
        default=True,
        description="Always true: the query tower L2-normalises its output, so inner "
        "products with item embeddings are cosines.",
    )
    took_ms: float = Field(description="Server time for this request in milliseconds.")


class BatchEmbedRequest(BaseModel):
    """Several queries to embed in one call (at most the server's max_batch_queries)."""

    model_config = ConfigDict(extra="forbid")

    queries: list[EmbedRequest] = Field(min_length=1, description="The queries, in order.")


class BatchEmbedResponse(BaseModel):
    """One embedding per query, in request order."""

    results: list[EmbedResponse] = Field(description="The embeddings, in request order.")
    took_ms: float = Field(description="Server time for the whole call in milliseconds.")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer: a code, a message naming the bad field and value, no traceback."""

    error: ErrorDetail
