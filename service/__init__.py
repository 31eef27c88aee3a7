"""HTTP service: reads a model bundle and an index version, answers retrieval queries.

Run it with ``retrieval serve --model M --index R [--data D | --redis-url URL]``; the
OpenAPI description is served at ``/docs``. Endpoints:

``POST /v1/retrieve``
    ``{"query": {...}, "k": 1000, "exclude_ids": [...]}`` (inline features, keyed like
    users.parquet, plus ``history``: catalog item ids, most recent first) or
    ``{"user_id": "196", "k": 1000, "exclude_seen": true}`` (features, history and seen
    items from the feature store: the user's train+valid interactions, exactly as the
    offline evaluation builds its queries). Answer: ``{"ids", "scores", "model_version",
    "index_version", "took_ms", "cached"}``, ids best first. k defaults to 1000, 1..2048.
``POST /v1/retrieve/batch``
    ``{"queries": [<retrieve request>, ...]}`` (at most `max_batch_queries`).
``GET /v1/info``
    model and index versions, catalog size, the query schema, limits, batching figures.
``GET /healthz``, ``GET /readyz``, ``GET /metrics``
    liveness, readiness (503 until loaded and while shutting down), Prometheus metrics.

Errors are ``{"error": {"code", "message", "field"}}``: 422 bad input, 401 API key,
404 unknown user, 413 body too large, 429 overload and 503 unavailable (with
``Retry-After``), 504 deadline; see `service.errors`.

Modules: `settings` (one pydantic-settings class), `app` (`create_app`, lifespan),
`routes` (one module per concern), `engine` (request -> job), `batcher` (micro-batching
queue), `retriever` (one batch: encode, tower, search), `query` (feature checks and
encoding), `feature_store`, `cache`, `redis_link`, `index_manager` (hot swap),
`middleware` (body limit, metrics, admission), `metrics`, `errors`, `server`, `cli`.
"""
