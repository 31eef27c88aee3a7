"""Synthetic catalogs of 1M-10M items drawn from a known score with explicit feature crosses.

`generate_synthetic_dataset` writes the dataset layout of `retrieval.data.dataset`
(users.parquet, items.parquet, interactions.parquet, schema.json), streamed chunk by chunk
with `pyarrow.parquet.ParquetWriter` inside `retrieval.atomic.atomic_directory`, so an
interrupted run leaves no dataset directory behind. Memory is O(items + users + chunk),
never O(users x items): peak RSS 0.35 GiB for 1M items / 100k users / 2M interactions,
1.3 GiB for 10M items / 1M users / 10M interactions (bench/bench_synth.py).

Entities
--------
Users: `segment` (8 values, mildly skewed), `country` (20, Zipf), `device` (4, carries no
signal: a distractor) and `age` (normal(38, 12) clipped to [16, 85]; 3 % of the values are
written as null, but the score uses the true age). Hidden: a latent vector p_u of norm
sqrt(d) in a uniformly random direction (d = 8) and an activity weight.

Items: `category` (50, Zipf-ish sizes), `price_band` (5; per-category mix drawn from a
Dirichlet(2)), `price` = exp(1.5 + 0.8 band + offset[category] + 0.25 z) (log-normal),
`quality` ~ N(0, 1), `brand` (num_items / 100 brands, uniform), `tags` (1-4 distinct of 200;
each tag is one of the category's 8 "home" tags with probability 0.7, else uniform).
Hidden: a popularity rank r_i (a random permutation) and a latent vector
q_i = (0.6 b_brand(i) + 0.8 e_i) / sqrt(d), with b, e ~ N(0, I): a brand explains 36 % of
its items' latent variance, and <p_u, q_i> ~ N(0, 1) for every user.

Ground-truth score
------------------
For user u and item i, with k(i) = (category_i, price_band_i) the item's "cell" (250 cells)::

    s(u, i) = T[segment_u, category_i, price_band_i]        3-way cross, sd 1.5
            + C[country_u, category_i]                      2-way cross, sd 0.75
            + 0.75 * z_age_u * (price_band_i - 2) / 2        dense x categorical cross
            + <p_u, q_i>                                    latent affinity, sd 1
            + log w_i,   w_i = (r_i + 1)^-0.9 * exp(0.5 quality_i)   Zipf popularity

T and C are i.i.d. normal tables, centred over users (T[:, c, b] and C[:, c] have mean 0
over segments / countries), so averaged over users no cell is preferred: the cross terms are
pure user x item interactions that no sum of per-feature effects can express.
z_age = (age - 38) / 12.

Sampling (per user, never a users x items matrix)
-------------------------------------------------
Write p(i | u) ~ exp(s(u, i)) = p0(i | u) exp(<p_u, q_i>), where the proposal
p0(i | u) ~ exp(x(u, k(i))) w_i holds every term but the latent one (x = T + C + age term,
a function of the user and the cell only). Each draw is a sampling-importance-resampling
step:

1. 16 candidates are drawn i.i.d. from p0, exactly, in two stages: a cell k with
   probability ~ exp(x(u, k)) W_k, where W_k = sum of w_i over the cell's items (a
   (users in block) x 250 table), then an item of that cell with probability w_i / W_k
   (inverse CDF over the catalog's cumulative weights, items grouped by cell, with a
   guide table: O(1) expected steps per draw);
2. one candidate is kept with probability ~ exp(<p_u, q_i>).

With infinitely many candidates this samples p exactly; with 16 the latent term is
slightly tempered: the kept item has probability p0(i | u) g_u(<p_u, q_i>) for an
increasing g_u. On a 40,000-item catalog (8 users, 40,000 draws each) the sampled items
recover 74-100 % (median 90 %) of the gap in E[log p(i | u)] between sampling p0 and
sampling p exactly, and the cell marginals are 0.02-0.06 in total variation from p's
(p0's: 0.06-0.22); see tests/retrieval/test_synthetic.py.

A user's interactions are the first n_u distinct items of the i.i.d. sequence of draws
(sampling without replacement), in draw order. n_u = 5 + a share of the remaining
num_interactions - 5 * num_users proportional to a log-normal(sigma=1) activity weight,
rounded so the shares sum exactly (capped at half the catalog). A user first draws
ceil(1.25 n_u) + 2 items; one still short of n_u distinct items draws again (up to 8
rounds); a user short after that keeps fewer (`stats["generator"]["shortfall"]`, 0 in
practice). Timestamps start at a random second of 2020 and increase by
1 s + Exponential(8 h) per event, so each user's events are in strictly increasing time.

Determinism
-----------
Every random stream is a `numpy.random.Generator` seeded with (seed, stream[, block]):
global tables, per-user arrays, item blocks of 65,536 items and user blocks of 1,024 users
each have their own stream. The tables (hence the files' rows) depend on `seed` and the
sizes only, not on `chunk_size`; `chunk_size` changes the parquet row groups, so file bytes
are identical for equal (seed, sizes, chunk_size).

Example:
    >>> import tempfile, pathlib
    >>> import pyarrow.parquet as pq
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "synth"
    >>> stats = generate_synthetic_dataset(
    ...     out, num_items=3000, num_users=50, num_interactions=600, seed=0
    ... )
    >>> stats["users"], stats["items"], stats["interactions"]["total"]
    (50, 3000, 600)
    >>> pq.read_table(out / "interactions.parquet").column_names
    ['user_id', 'item_id', 'timestamp', 'split']
    >>> pq.read_table(out / "items.parquet").column("item_id")[42].as_py()
    'i00000042'
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.atomic import atomic_directory
from retrieval.data.split import SPLIT_NAMES, split_codes_for_sorted
from retrieval.features import (
    INTERACTIONS_FILE,
    ITEM_ID,
    ITEMS_FILE,
    SCHEMA_FILE,
    SPLIT,
    TIMESTAMP,
    USER_ID,
    USERS_FILE,
    DatasetSchema,
    FeatureKind,
    FeatureSpec,
)

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the generated rows change for a given seed and sizes

# --- entities
NUM_SEGMENTS = 8
COUNTRIES = (
    "US", "IN", "BR", "GB", "DE", "FR", "JP", "MX", "ID", "TR",
    "IT", "ES", "CA", "KR", "PL", "NL", "AU", "SE", "AR", "ZA",
)  # fmt: skip
DEVICES = ("android", "ios", "web", "tv")
DEVICE_PROBS = (0.45, 0.35, 0.15, 0.05)
AGE_MEAN, AGE_SD, AGE_MIN, AGE_MAX = 38.0, 12.0, 16.0, 85.0
AGE_MISSING_RATE = 0.03
NUM_CATEGORIES = 50
NUM_PRICE_BANDS = 5
NUM_CELLS = NUM_CATEGORIES * NUM_PRICE_BANDS  # cell = category * NUM_PRICE_BANDS + band
ITEMS_PER_BRAND = 100
NUM_TAGS = 200
HOME_TAGS_PER_CATEGORY = 8
HOME_TAG_PROB = 0.7
MAX_TAGS = 4
LATENT_DIM = 8

# --- ground-truth score (see the module docstring)
CROSS_SEGMENT_CATEGORY_BAND_SD = 1.5  # T[segment, category, band]
CROSS_COUNTRY_CATEGORY_SD = 0.75  # C[country, category]
AGE_PRICE_WEIGHT = 0.75  # z_age * (band - 2) / 2
LATENT_DOT_SD = 1.0  # sd of <p_u, q_i>
BRAND_LATENT_SHARE = 0.6  # q_i = 0.6 brand vector + 0.8 own noise (unit variance)
ZIPF_EXPONENT = 0.9  # w_i = (rank + 1)^-0.9 * exp(0.5 quality)
QUALITY_WEIGHT = 0.5

# --- sampling
MIN_INTERACTIONS_PER_USER = 5
ACTIVITY_SIGMA = 1.0  # log-normal sigma of the per-user activity weight
CANDIDATES_PER_DRAW = 16  # sampling-importance-resampling candidates within a cell
OVERSAMPLE_FRACTION = 0.25  # draws per user: ceil(1.25 n_u) + 2, deduplicated to n_u
OVERSAMPLE_EXTRA = 2
MAX_DRAW_ROUNDS = 8  # a user still short of n_u distinct items draws 2 (r + 2) x the deficit
START_TIME = 1_577_836_800  # 2020-01-01T00:00:00Z
START_SPREAD_S = 365 * 24 * 3600
MEAN_GAP_S = 8 * 3600.0

# --- streams and blocks: the unit of randomness, independent of chunk_size
USERS_PER_BLOCK = 1024
ITEMS_PER_BLOCK = 65_536
_STREAM_TABLES, _STREAM_POPULARITY, _STREAM_ITEMS, _STREAM_USERS, _STREAM_EVENTS = range(5)

# --- schema
ID_EMBEDDING_DIM = 32  # user_id, item_id and history (which shares item_id's table)
HISTORY_LENGTH = 20
USER_ID_MIN_COUNT = 3
ITEM_ID_MIN_COUNT = 2

DEFAULT_CHUNK_SIZE = 1_000_000

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclasses.dataclass(frozen=True)
class _Tables:
    """Global parameters of the generative model (small)."""

    segment_probs: FloatArray  # (S,)
    country_probs: FloatArray  # (countries,)
    category_probs: FloatArray  # (categories,)
    band_probs: FloatArray  # (categories, bands): price-band mix per category
    price_offset: FloatArray  # (categories,): log-price offset per category
    home_tags: IntArray  # (categories, HOME_TAGS_PER_CATEGORY)
    cross: FloatArray  # (S, cells): T[segment, category * bands + band]
    country_cross: FloatArray  # (countries, categories): C
    brand_latent: npt.NDArray[np.float32]  # (brands, d)


@dataclasses.dataclass(frozen=True)
class _Catalog:
    """Item columns in item-index order, plus the within-cell sampler (cell order)."""

    category: npt.NDArray[np.int8]  # (N,)
    price_band: npt.NDArray[np.int8]  # (N,)
    brand: npt.NDArray[np.int32]  # (N,)
    price: npt.NDArray[np.float32]  # (N,)
    quality: npt.NDArray[np.float32]  # (N,)
    tag_offsets: IntArray  # (N + 1,)
    tag_values: npt.NDArray[np.int16]  # (total tags,)
    # sampler: items sorted by cell (stable), position p <-> item item_of_position[p]
    item_of_position: IntArray  # (N,)
    latent: npt.NDArray[np.float32]  # (N, d), in cell order
    cumulative_weight: FloatArray  # (N,) cumsum of w in cell order
    cell_start: IntArray  # (cells + 1,) first position of each cell
    cell_weight: FloatArray  # (cells,) W_k
    cell_weight_before: FloatArray  # (cells,) cumulative weight before the cell's first item
    guide: IntArray  # (N,) guide[g] = first position with cumulative_weight > g * total / N


@dataclasses.dataclass(frozen=True)
class _Users:
    segment: npt.NDArray[np.int8]  # (U,)
    country: npt.NDArray[np.int8]  # (U,)
    device: npt.NDArray[np.int8]  # (U,)
    age: npt.NDArray[np.float32]  # (U,) true age
    age_missing: npt.NDArray[np.bool_]  # (U,) written as null
    latent: npt.NDArray[np.float32]  # (U, d)
    num_interactions: IntArray  # (U,) target n_u
    start_time: IntArray  # (U,)


@dataclasses.dataclass(frozen=True)
class _EventBlock:
    """The interactions of one user block, sorted by (user, timestamp)."""

    user_index: IntArray
    item_index: IntArray
    timestamp: IntArray
    shortfall: int  # users that got fewer than n_u distinct items
    duplicate_draws: int


def generate_synthetic_dataset(
    out_dir: str | Path,
    *,
    num_items: int,
    num_users: int,
    num_interactions: int,
    seed: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate a synthetic dataset directory from a known ground-truth score.

    The generative model (feature crosses, latent affinity, Zipf popularity) and the
    hierarchical sampler are described in the module docstring.

    Args:
        out_dir: the dataset directory to create (written atomically).
        num_items: catalog size (>= 1,000; ids 'i00000000'...).
        num_users: number of users (ids 'u0000000'...).
        num_interactions: requested total, >= 5 * num_users; the result equals it unless
            some users run out of distinct items (reported as `shortfall`).
        seed: random seed (>= 0). The rows depend on (seed, sizes) only.
        chunk_size: rows per parquet row group / write; bounds the memory of the
            interactions buffer (whole blocks of 1,024 users are written together).
        overwrite: replace an existing `out_dir`.

    Returns:
        Stats: ``users``, ``items``, ``interactions`` ({total, train, valid, test}),
        ``interactions_per_user`` (min/median/mean/max), ``generator`` (model parameters,
        seed, requested total, shortfall), ``elapsed_s`` (total and per stage), ``files``
        (bytes per file). The same stats, less timings and file sizes, are stored in
        ``schema.json``.

    Raises:
        ValueError: a size, the seed or `chunk_size` is out of range.
        FileExistsError: `out_dir` exists and `overwrite` is false.
    """
    _check_arguments(num_items, num_users, num_interactions, seed, chunk_size)
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    logger.info(
        "synthetic dataset: items=%d users=%d interactions=%d seed=%d chunk_size=%d -> %s",
        *(num_items, num_users, num_interactions, seed, chunk_size, out_dir),
    )
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        stage = time.perf_counter()
        tables = _make_tables(num_items, seed)
        catalog = _make_catalog(num_items, tables, seed)
        users = _make_users(num_users, num_interactions, num_items, tables, seed)
        timings["model"] = time.perf_counter() - stage
        logger.info("built the generative model in %.1f s", timings["model"])

        stage = time.perf_counter()
        _write_items(tmp / ITEMS_FILE, catalog, chunk_size)
        _write_users(tmp / USERS_FILE, users, chunk_size)
        timings["entities"] = time.perf_counter() - stage

        stage = time.perf_counter()
        event_stats = _write_interactions(
            tmp / INTERACTIONS_FILE, users, catalog, tables, seed, chunk_size
        )
        timings["interactions"] = time.perf_counter() - stage

        stats: dict[str, Any] = {
            "users": num_users,
            "items": num_items,
            "interactions": event_stats["interactions"],
            "interactions_per_user": event_stats["interactions_per_user"],
            "generator": {
                **_generator_parameters(),
                "seed": seed,
                "requested_interactions": num_interactions,
                "shortfall": event_stats["shortfall"],
                "duplicate_draws": event_stats["duplicate_draws"],
            },
        }
        schema = synthetic_schema(num_items, stats)
        (tmp / SCHEMA_FILE).write_text(schema.to_json(), encoding="utf-8")
        files = {path.name: path.stat().st_size for path in sorted(tmp.iterdir())}
    timings["total"] = time.perf_counter() - start
    logger.info(
        "wrote %s: %d interactions in %.1f s",
        out_dir,
        stats["interactions"]["total"],
        timings["total"],
    )
    return {**stats, "elapsed_s": timings, "files": files}


def synthetic_schema(num_items: int, stats: dict[str, Any] | None = None) -> DatasetSchema:
    """The `DatasetSchema` of a synthetic dataset of `num_items` items.

    >>> schema = synthetic_schema(1_000_000)
    >>> schema.name, [s.name for s in schema.item_features]
    ('synth-1000000', ['item_id', 'category', 'price_band', 'brand', 'tags', 'price', 'quality'])
    >>> {s.name: s.num_buckets for s in schema.item_features if s.kind == "hashed"}
    {'brand': 16384}
    """
    num_brands = _num_brands(num_items)
    brand_buckets = max(64, min(1 << 18, 1 << max(0, num_brands - 1).bit_length()))
    cat = FeatureKind.CATEGORICAL
    return DatasetSchema(
        name=f"synth-{num_items}",
        query_features=(
            FeatureSpec(USER_ID, cat, embedding_dim=ID_EMBEDDING_DIM, min_count=USER_ID_MIN_COUNT),
            FeatureSpec("segment", cat, embedding_dim=8),
            FeatureSpec("country", cat, embedding_dim=8),
            FeatureSpec("device", cat, embedding_dim=4),
            FeatureSpec("age", FeatureKind.DENSE, missing_indicator=True),
            FeatureSpec(
                "history",
                FeatureKind.HISTORY,
                embedding_dim=ID_EMBEDDING_DIM,
                max_length=HISTORY_LENGTH,
                shared_with=ITEM_ID,
            ),
        ),
        item_features=(
            FeatureSpec(ITEM_ID, cat, embedding_dim=ID_EMBEDDING_DIM, min_count=ITEM_ID_MIN_COUNT),
            FeatureSpec("category", cat, embedding_dim=16),
            FeatureSpec("price_band", cat, embedding_dim=4),
            FeatureSpec("brand", FeatureKind.HASHED, embedding_dim=16, num_buckets=brand_buckets),
            FeatureSpec("tags", FeatureKind.BAG, embedding_dim=8, max_length=MAX_TAGS),
            FeatureSpec("price", FeatureKind.DENSE),
            FeatureSpec("quality", FeatureKind.DENSE),
        ),
        item_id_feature=ITEM_ID,
        stats=dict(stats or {}),
    )


# --------------------------------------------------------------------------- arguments


def _check_arguments(
    num_items: int, num_users: int, num_interactions: int, seed: int, chunk_size: int
) -> None:
    if num_items < 1000:
        raise ValueError(f"`num_items` must be >= 1000; got {num_items}")
    if num_items >= 10**8:
        raise ValueError(f"`num_items` must be < 100,000,000; got {num_items}")
    if num_users < 1:
        raise ValueError(f"`num_users` must be >= 1; got {num_users}")
    minimum = MIN_INTERACTIONS_PER_USER * num_users
    if num_interactions < minimum:
        raise ValueError(
            f"`num_interactions` must be >= {MIN_INTERACTIONS_PER_USER} * num_users = "
            f"{minimum}; got {num_interactions}"
        )
    if num_interactions >= 2**31:
        raise ValueError(f"`num_interactions` must be < 2**31; got {num_interactions}")
    if seed < 0:
        raise ValueError(f"`seed` must be >= 0; got {seed}")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1; got {chunk_size}")


def _generator_parameters() -> dict[str, Any]:
    return {
        "name": "retrieval.data.synthetic",
        "version": GENERATOR_VERSION,
        "latent_dim": LATENT_DIM,
        "cross_segment_category_band_sd": CROSS_SEGMENT_CATEGORY_BAND_SD,
        "cross_country_category_sd": CROSS_COUNTRY_CATEGORY_SD,
        "age_price_weight": AGE_PRICE_WEIGHT,
        "latent_dot_sd": LATENT_DOT_SD,
        "brand_latent_share": BRAND_LATENT_SHARE,
        "zipf_exponent": ZIPF_EXPONENT,
        "quality_weight": QUALITY_WEIGHT,
        "min_interactions_per_user": MIN_INTERACTIONS_PER_USER,
        "activity_sigma": ACTIVITY_SIGMA,
        "candidates_per_draw": CANDIDATES_PER_DRAW,
    }


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _num_brands(num_items: int) -> int:
    return max(1, num_items // ITEMS_PER_BRAND)


# --------------------------------------------------------------------------- model


def _make_tables(num_items: int, seed: int) -> _Tables:
    rng = _rng(seed, _STREAM_TABLES)
    segment_probs = _power_law_probs(NUM_SEGMENTS, 0.3)
    country_probs = _power_law_probs(len(COUNTRIES), 1.0)
    category_probs = _power_law_probs(NUM_CATEGORIES, 0.6)
    band_probs = rng.dirichlet(np.full(NUM_PRICE_BANDS, 2.0), size=NUM_CATEGORIES)
    price_offset = rng.normal(0.0, 0.3, NUM_CATEGORIES)
    home_tags = np.stack(
        [rng.choice(NUM_TAGS, HOME_TAGS_PER_CATEGORY, replace=False) for _ in range(NUM_CATEGORIES)]
    ).astype(np.int64)
    cross = rng.normal(0.0, CROSS_SEGMENT_CATEGORY_BAND_SD, (NUM_SEGMENTS, NUM_CELLS))
    cross -= cross.mean(axis=0, keepdims=True)  # no cell preferred on average over segments
    country_cross = rng.normal(0.0, CROSS_COUNTRY_CATEGORY_SD, (len(COUNTRIES), NUM_CATEGORIES))
    country_cross -= country_cross.mean(axis=0, keepdims=True)
    brand_latent = rng.standard_normal((_num_brands(num_items), LATENT_DIM), dtype=np.float32)
    return _Tables(
        segment_probs=segment_probs,
        country_probs=country_probs,
        category_probs=category_probs,
        band_probs=band_probs,
        price_offset=price_offset,
        home_tags=home_tags,
        cross=cross,
        country_cross=country_cross,
        brand_latent=brand_latent,
    )


def _power_law_probs(n: int, exponent: float) -> FloatArray:
    """p_j proportional to (j + 1)^-exponent."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def _unit_sphere(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    """n vectors uniform on the unit sphere of R^LATENT_DIM: [n, d]."""
    x = rng.standard_normal((n, LATENT_DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _make_catalog(num_items: int, tables: _Tables, seed: int) -> _Catalog:
    category = np.empty(num_items, np.int8)
    band = np.empty(num_items, np.int8)
    brand = np.empty(num_items, np.int32)
    price = np.empty(num_items, np.float32)
    quality = np.empty(num_items, np.float32)
    latent = np.empty((num_items, LATENT_DIM), np.float32)
    tag_lists: list[npt.NDArray[np.int16]] = []
    tag_lengths = np.empty(num_items, np.int64)
    num_brands = len(tables.brand_latent)
    own_share = math.sqrt(1.0 - BRAND_LATENT_SHARE**2)
    scale = 1.0 / math.sqrt(LATENT_DIM)  # q_i ~ N(0, I / d): <p_u, q_i> | p_u ~ N(0, |p_u|^2 / d)
    for block, lo in enumerate(range(0, num_items, ITEMS_PER_BLOCK)):
        hi = min(num_items, lo + ITEMS_PER_BLOCK)
        n = hi - lo
        rng = _rng(seed, _STREAM_ITEMS, block)
        cat = rng.choice(NUM_CATEGORIES, n, p=tables.category_probs)
        bnd = _sample_rows(tables.band_probs, cat, rng.random(n))
        category[lo:hi] = cat
        band[lo:hi] = bnd
        brand[lo:hi] = rng.integers(0, num_brands, n)
        log_price = 1.5 + 0.8 * bnd + tables.price_offset[cat] + 0.25 * rng.standard_normal(n)
        price[lo:hi] = np.exp(log_price)
        quality[lo:hi] = rng.standard_normal(n)
        noise = rng.standard_normal((n, LATENT_DIM), dtype=np.float32)
        own = BRAND_LATENT_SHARE * tables.brand_latent[brand[lo:hi]] + own_share * noise
        latent[lo:hi] = scale * own
        values, lengths = _sample_tags(rng, cat, tables.home_tags)
        tag_lists.append(values)
        tag_lengths[lo:hi] = lengths
    tag_offsets = np.zeros(num_items + 1, np.int64)
    np.cumsum(tag_lengths, out=tag_offsets[1:])

    rank = _rng(seed, _STREAM_POPULARITY).permutation(num_items)
    weight = (rank + 1.0) ** -ZIPF_EXPONENT * np.exp(QUALITY_WEIGHT * quality.astype(np.float64))
    del rank
    cell = category.astype(np.int64) * NUM_PRICE_BANDS + band
    order = np.argsort(cell, kind="stable")
    cell_start = np.zeros(NUM_CELLS + 1, np.int64)
    np.cumsum(np.bincount(cell, minlength=NUM_CELLS), out=cell_start[1:])
    cumulative = np.cumsum(weight[order])
    del weight, cell
    padded = np.r_[0.0, cumulative]
    cell_weight = padded[cell_start[1:]] - padded[cell_start[:-1]]
    guide = guide_table(cumulative, num_items)
    latent_sorted = latent[order]
    del latent
    return _Catalog(
        category=category,
        price_band=band,
        brand=brand,
        price=price,
        quality=quality,
        tag_offsets=tag_offsets,
        tag_values=np.concatenate(tag_lists),
        item_of_position=order.astype(np.int64),
        latent=latent_sorted,
        cumulative_weight=cumulative,
        cell_start=cell_start,
        cell_weight=cell_weight,
        cell_weight_before=padded[cell_start[:-1]],
        guide=guide,
    )


def _sample_tags(
    rng: np.random.Generator, category: IntArray, home_tags: IntArray
) -> tuple[npt.NDArray[np.int16], IntArray]:
    """1-4 distinct tags per item, sorted ascending; returns (flat values, lengths)."""
    n = len(category)
    count = rng.integers(1, MAX_TAGS + 1, n)  # (n,)
    from_home = rng.random((n, MAX_TAGS)) < HOME_TAG_PROB
    home = home_tags[category[:, None], rng.integers(0, HOME_TAGS_PER_CATEGORY, (n, MAX_TAGS))]
    tags = np.where(from_home, home, rng.integers(0, NUM_TAGS, (n, MAX_TAGS)))  # (n, 4)
    tags[np.arange(MAX_TAGS)[None, :] >= count[:, None]] = NUM_TAGS  # sentinel: unused slot
    tags.sort(axis=1)
    repeated = np.zeros_like(tags, dtype=bool)
    repeated[:, 1:] = tags[:, 1:] == tags[:, :-1]
    tags[repeated] = NUM_TAGS
    tags.sort(axis=1)
    valid = tags < NUM_TAGS
    return tags[valid].astype(np.int16), valid.sum(axis=1).astype(np.int64)


def _make_users(
    num_users: int, num_interactions: int, num_items: int, tables: _Tables, seed: int
) -> _Users:
    rng = _rng(seed, _STREAM_USERS)
    segment = rng.choice(NUM_SEGMENTS, num_users, p=tables.segment_probs).astype(np.int8)
    country = rng.choice(len(COUNTRIES), num_users, p=tables.country_probs).astype(np.int8)
    device = rng.choice(len(DEVICES), num_users, p=np.asarray(DEVICE_PROBS)).astype(np.int8)
    age = np.clip(rng.normal(AGE_MEAN, AGE_SD, num_users), AGE_MIN, AGE_MAX).astype(np.float32)
    age_missing = rng.random(num_users) < AGE_MISSING_RATE
    # |p_u| = sd sqrt(d) for every user, so <p_u, q_i> ~ N(0, LATENT_DOT_SD^2) for each user.
    latent = LATENT_DOT_SD * math.sqrt(LATENT_DIM) * _unit_sphere(rng, num_users)
    activity = rng.lognormal(-(ACTIVITY_SIGMA**2) / 2, ACTIVITY_SIGMA, num_users)
    start_time = START_TIME + rng.integers(0, START_SPREAD_S, num_users)
    return _Users(
        segment=segment,
        country=country,
        device=device,
        age=age,
        age_missing=age_missing,
        latent=latent,
        num_interactions=_allocate_interactions(activity, num_interactions, num_items),
        start_time=start_time.astype(np.int64),
    )


def _allocate_interactions(activity: FloatArray, total: int, num_items: int) -> IntArray:
    """n_u = MIN + share of the rest proportional to `activity`, summing exactly to `total`.

    Largest-remainder rounding; a user's count is capped at half the catalog.

    >>> _allocate_interactions(np.array([1.0, 1.0, 2.0]), 20, 1000).tolist()
    [6, 6, 8]
    """
    extra_total = total - MIN_INTERACTIONS_PER_USER * len(activity)
    share = extra_total * activity / activity.sum()
    base = np.floor(share).astype(np.int64)
    remainder = int(extra_total - base.sum())
    if remainder > 0:
        largest = np.argsort(base - share, kind="stable")[:remainder]  # largest fractions
        base[largest] += 1
    return np.minimum(
        base + MIN_INTERACTIONS_PER_USER, max(MIN_INTERACTIONS_PER_USER, num_items // 2)
    )


# --------------------------------------------------------------------------- sampling


def guide_table(cumulative: FloatArray, num_buckets: int) -> IntArray:
    """guide[g] = first position p with cumulative[p] > g * total / num_buckets.

    The bucket of a target x is floor(x * num_buckets / total); its guide entry is at or
    before the first position above x, so `guided_search` only scans forward from it.

    >>> guide_table(np.array([1.0, 1.0, 3.0, 4.0]), 4).tolist()
    [0, 2, 2, 3]
    """
    thresholds = np.arange(num_buckets, dtype=np.float64) * (float(cumulative[-1]) / num_buckets)
    return np.searchsorted(cumulative, thresholds, side="right").astype(np.int64)


def guided_search(cumulative: FloatArray, guide: IntArray, target: FloatArray) -> IntArray:
    """First position p with cumulative[p] > target (inverse CDF), for many targets at once.

    Equals ``np.searchsorted(cumulative, target, side="right")`` (capped at the last
    position) in O(1) expected steps instead of O(log n) cache misses: a guide-table jump,
    then a vectorised forward scan over the targets not yet placed.

    Args:
        cumulative: [P] non-decreasing cumulative weights.
        guide: [G] `guide_table(cumulative, G)`.
        target: [n] values in [0, cumulative[-1]).

    Returns:
        [n] positions in [0, P).

    >>> cumulative = np.array([1.0, 1.0, 3.0, 4.0])
    >>> guided_search(cumulative, guide_table(cumulative, 4), np.array([0.0, 1.0, 2.9, 3.5])).tolist()
    [0, 2, 2, 3]
    """
    end = len(cumulative) - 1
    bucket = (target * (len(guide) / float(cumulative[-1]))).astype(np.int64)  # (n,)
    position = guide[np.clip(bucket, 0, len(guide) - 1)]  # (n,) at or before the answer
    active = np.flatnonzero((cumulative[position] <= target) & (position < end))
    while active.size:
        position[active] += 1
        moved = position[active]
        active = active[(cumulative[moved] <= target[active]) & (moved < end)]
    return position


def _sample_rows(probs: FloatArray, rows: IntArray, uniform: FloatArray) -> IntArray:
    """Draw one column per entry of `rows` from the categorical distribution `probs[row]`.

    Inverse CDF over all rows at once: row r's CDF is shifted to (r, r + 1], so one
    guided search serves every row. Zero-probability columns are never drawn.

    Args:
        probs: [rows, columns] non-negative weights, each row with a positive sum
            (at most 65,536 rows, so that r + cdf keeps ~1e-11 resolution).
        rows: [n] row of each draw.
        uniform: [n] uniforms in [0, 1).

    Returns:
        [n] column indices.

    >>> probs = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    >>> _sample_rows(probs, np.array([0, 1, 0, 1]), np.array([0.0, 0.2, 0.99, 0.7])).tolist()
    [1, 0, 1, 2]
    """
    num_rows, num_columns = probs.shape
    assert num_rows <= 65_536, num_rows
    cdf = np.cumsum(probs, axis=1)  # (R, K)
    cdf /= cdf[:, -1:]
    flat = (cdf + np.arange(num_rows, dtype=np.float64)[:, None]).ravel()  # (R K,)
    guide = guide_table(flat, num_rows * num_columns)
    # Scaling u by (1 - 1e-12) keeps r + u below r + 1, the row's last value, after rounding.
    position = guided_search(flat, guide, rows + uniform * (1.0 - 1e-12))
    return np.clip(position - rows * num_columns, 0, num_columns - 1)


def _sample_in_cells(catalog: _Catalog, cells: IntArray, uniform: FloatArray) -> IntArray:
    """Catalog positions drawn within `cells` proportionally to the popularity weight w.

    Inverse CDF on the catalog's cumulative weight (items grouped by cell): the target
    lies in the cell's slice, found by `guided_search`.

    Args:
        catalog: the catalog and its sampler.
        cells: [n] cell of each draw.
        uniform: [n] uniforms in [0, 1).

    Returns:
        [n] positions in cell order (index `catalog.item_of_position` to get items).
    """
    target = catalog.cell_weight_before[cells] + uniform * catalog.cell_weight[cells]  # (n,)
    position = guided_search(catalog.cumulative_weight, catalog.guide, target)
    # Rounding can land one past a cell's end: clip into the cell.
    return np.clip(position, catalog.cell_start[cells], catalog.cell_start[cells + 1] - 1)


def _interaction_block(
    block: int, users: _Users, catalog: _Catalog, tables: _Tables, seed: int
) -> _EventBlock:
    """Interactions of users [block * USERS_PER_BLOCK, ...), from the block's own stream."""
    rng = _rng(seed, _STREAM_EVENTS, block)
    lo = block * USERS_PER_BLOCK
    hi = min(lo + USERS_PER_BLOCK, len(users.segment))
    num_block_users = hi - lo
    target = users.num_interactions[lo:hi]  # (B,)
    cell_probs = _cell_probabilities(users, catalog, tables, lo, hi)  # (B, K)
    user_latent = users.latent[lo:hi]  # (B, d)

    # Draw i.i.d. items per user and keep the distinct ones in draw order; users still short
    # of n_u distinct items draw again (later draws come after earlier ones).
    distinct_local = np.empty(0, np.int64)
    distinct_item = np.empty(0, np.int64)
    draws_per_user = target + np.ceil(OVERSAMPLE_FRACTION * target).astype(np.int64)
    draws_per_user += OVERSAMPLE_EXTRA
    num_draws = 0
    for draw_round in range(MAX_DRAW_ROUNDS):
        local = np.repeat(np.arange(num_block_users), draws_per_user)  # (n,) user of each draw
        item = _draw_items(rng, catalog, cell_probs, user_latent, local)  # (n,)
        num_draws += len(local)
        all_local = np.concatenate([distinct_local, local])
        all_item = np.concatenate([distinct_item, item])
        first = _first_occurrences(all_local, all_item)
        group = np.argsort(all_local[first], kind="stable")  # by user, draw order kept
        distinct_local = all_local[first][group]
        distinct_item = all_item[first][group]
        deficit = target - np.bincount(distinct_local, minlength=num_block_users)
        if not np.any(deficit > 0):
            break
        draws_per_user = np.where(deficit > 0, 2 * (draw_round + 2) * deficit, 0)
    duplicate_draws = num_draws - len(distinct_local)

    # Keep each user's first n_u distinct items.
    starts = np.searchsorted(distinct_local, np.arange(num_block_users))
    rank = np.arange(len(distinct_local)) - starts[distinct_local]
    keep = rank < target[distinct_local]
    kept_local, kept_item = distinct_local[keep], distinct_item[keep]
    counts = np.bincount(kept_local, minlength=num_block_users)

    # Timestamps: start time + cumulative gaps of 1 s + Exponential(MEAN_GAP_S).
    gaps = 1 + np.floor(rng.exponential(MEAN_GAP_S, len(kept_local))).astype(np.int64)
    elapsed = np.cumsum(gaps)
    user_first = np.r_[0, np.cumsum(counts)[:-1]]
    before_user = np.repeat(elapsed[user_first] - gaps[user_first], counts)
    timestamp = users.start_time[lo:hi][kept_local] + (elapsed - before_user)
    return _EventBlock(
        user_index=kept_local + lo,
        item_index=kept_item,
        timestamp=timestamp,
        shortfall=int(np.count_nonzero(counts < target)),
        duplicate_draws=duplicate_draws,
    )


def _cell_probabilities(
    users: _Users, catalog: _Catalog, tables: _Tables, lo: int, hi: int
) -> FloatArray:
    """Unnormalised P(cell | user) = exp(T + C + age term) * W_k for users [lo, hi): (B, K)."""
    age_z = (users.age[lo:hi].astype(np.float64) - AGE_MEAN) / AGE_SD  # (B,)
    band_of_cell = np.tile(np.arange(NUM_PRICE_BANDS), NUM_CATEGORIES)  # (K,)
    category_of_cell = np.repeat(np.arange(NUM_CATEGORIES), NUM_PRICE_BANDS)  # (K,)
    logits = (
        tables.cross[users.segment[lo:hi]]
        + tables.country_cross[users.country[lo:hi]][:, category_of_cell]
        + AGE_PRICE_WEIGHT * age_z[:, None] * ((band_of_cell - 2) / 2.0)[None, :]
    )  # (B, K)
    return np.exp(logits - logits.max(axis=1, keepdims=True)) * catalog.cell_weight


def _draw_items(
    rng: np.random.Generator,
    catalog: _Catalog,
    cell_probs: FloatArray,
    user_latent: npt.NDArray[np.float32],
    local: IntArray,
) -> IntArray:
    """One item per row, from p(i | u) proportional to exp(s(u, i)) (module docstring).

    Args:
        rng: the block's stream.
        catalog: the catalog and its sampler.
        cell_probs: [B, K] unnormalised P(cell | user) of the block's users.
        user_latent: [B, d] p_u of the block's users.
        local: [n] user (row of `cell_probs`) of each draw.

    Returns:
        [n] item indices.
    """
    n, m = len(local), CANDIDATES_PER_DRAW
    # Proposal: everything but the latent term, p0(i | u) ~ exp(cross terms of cell(i)) w_i.
    cells = _sample_rows(cell_probs, np.repeat(local, m), rng.random(n * m))  # (n m,)
    candidates = _sample_in_cells(catalog, cells, rng.random(n * m)).reshape(n, m)  # (n, m)
    # Resample one candidate with probability ~ exp(<p_u, q_i>), the missing factor.
    candidate_latent = np.take(catalog.latent, candidates.ravel(), axis=0)  # (n m, d)
    affinity = np.einsum(
        "nmd,nd->nm", candidate_latent.reshape(*candidates.shape, -1), user_latent[local]
    )  # (n, m)
    weight = np.cumsum(np.exp(affinity - affinity.max(axis=1, keepdims=True)), axis=1)  # (n, m)
    chosen = np.sum(weight < rng.random(n)[:, None] * weight[:, -1:], axis=1)  # (n,)
    return catalog.item_of_position[candidates[np.arange(n), chosen]]


def _first_occurrences(group: IntArray, value: IntArray) -> npt.NDArray[np.bool_]:
    """Mask of rows whose (group, value) pair did not occur in an earlier row.

    >>> _first_occurrences(np.array([0, 0, 1, 0, 1]), np.array([7, 8, 7, 7, 7])).tolist()
    [True, True, True, False, False]
    """
    first = np.ones(len(group), dtype=bool)
    if len(group) == 0:
        return first
    key = group * (int(value.max()) + 1) + value  # (group, value) as one int64
    order = np.argsort(key, kind="stable")  # by key, earlier rows first among equals
    first[order[1:]] = key[order[1:]] != key[order[:-1]]
    return first


# --------------------------------------------------------------------------- writing


def _fixed_width_ids(prefix: str, index: npt.ArrayLike, width: int) -> pa.Array:
    """Strings prefix + zero-padded index ('i00000042'), built without Python loops.

    >>> _fixed_width_ids("u", np.array([0, 42]), 7).to_pylist()
    ['u0000000', 'u0000042']
    """
    values = np.asarray(index, dtype=np.int64)
    n = len(values)
    prefix_bytes = np.frombuffer(prefix.encode("ascii"), np.uint8)
    row = len(prefix_bytes) + width
    buffer = np.empty((n, row), np.uint8)
    buffer[:, : len(prefix_bytes)] = prefix_bytes
    rest = values.copy()
    for column in range(row - 1, len(prefix_bytes) - 1, -1):
        buffer[:, column] = rest % 10 + ord("0")
        rest //= 10
    if n and rest.max() > 0:
        raise ValueError(f"index {int(values.max())} does not fit {width} digits")
    offsets = np.arange(n + 1, dtype=np.int32) * row
    return pa.Array.from_buffers(
        pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(buffer)]
    )


def _id_width(count: int, minimum: int) -> int:
    return max(minimum, len(str(max(0, count - 1))))


def _names(prefix: str, count: int) -> pa.Array:
    width = len(str(count - 1))
    return pa.array([f"{prefix}{j:0{width}d}" for j in range(count)], pa.string())


def _take(names: pa.Array, codes: npt.ArrayLike) -> pa.Array:
    return names.take(pa.array(np.asarray(codes, dtype=np.int32)))


USERS_ARROW_SCHEMA = pa.schema(
    [
        (USER_ID, pa.string()),
        ("segment", pa.string()),
        ("country", pa.string()),
        ("device", pa.string()),
        ("age", pa.float32()),
    ]
)
ITEMS_ARROW_SCHEMA = pa.schema(
    [
        (ITEM_ID, pa.string()),
        ("category", pa.string()),
        ("price_band", pa.string()),
        ("brand", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("price", pa.float32()),
        ("quality", pa.float32()),
    ]
)
INTERACTIONS_ARROW_SCHEMA = pa.schema(
    [(USER_ID, pa.string()), (ITEM_ID, pa.string()), (TIMESTAMP, pa.int64()), (SPLIT, pa.string())]
)


def _write_users(path: Path, users: _Users, chunk_size: int) -> None:
    num_users = len(users.segment)
    width = _id_width(num_users, 7)
    segments = _names("seg", NUM_SEGMENTS)
    countries = pa.array(COUNTRIES, pa.string())
    devices = pa.array(DEVICES, pa.string())
    with pq.ParquetWriter(path, USERS_ARROW_SCHEMA) as writer:
        for lo, hi in _ranges(num_users, chunk_size):
            batch = pa.record_batch(
                [
                    _fixed_width_ids("u", np.arange(lo, hi), width),
                    _take(segments, users.segment[lo:hi]),
                    _take(countries, users.country[lo:hi]),
                    _take(devices, users.device[lo:hi]),
                    pa.array(users.age[lo:hi], pa.float32(), mask=users.age_missing[lo:hi]),
                ],
                schema=USERS_ARROW_SCHEMA,
            )
            writer.write_batch(batch)


def _write_items(path: Path, catalog: _Catalog, chunk_size: int) -> None:
    num_items = len(catalog.category)
    width = _id_width(num_items, 8)
    categories = _names("cat", NUM_CATEGORIES)
    bands = _names("band", NUM_PRICE_BANDS)
    tags = _names("tag", NUM_TAGS)
    num_brands = int(catalog.brand.max()) + 1 if num_items else 1
    brand_width = _id_width(_num_brands(num_items), 5)
    assert num_brands <= _num_brands(num_items)
    with pq.ParquetWriter(path, ITEMS_ARROW_SCHEMA) as writer:
        for lo, hi in _ranges(num_items, chunk_size):
            first, end = int(catalog.tag_offsets[lo]), int(catalog.tag_offsets[hi])
            tag_lists = pa.ListArray.from_arrays(
                pa.array((catalog.tag_offsets[lo : hi + 1] - first).astype(np.int32)),
                _take(tags, catalog.tag_values[first:end]),
            )
            batch = pa.record_batch(
                [
                    _fixed_width_ids("i", np.arange(lo, hi), width),
                    _take(categories, catalog.category[lo:hi]),
                    _take(bands, catalog.price_band[lo:hi]),
                    _fixed_width_ids("b", catalog.brand[lo:hi], brand_width),
                    tag_lists,
                    pa.array(catalog.price[lo:hi], pa.float32()),
                    pa.array(catalog.quality[lo:hi], pa.float32()),
                ],
                schema=ITEMS_ARROW_SCHEMA,
            )
            writer.write_batch(batch)


def _write_interactions(
    path: Path, users: _Users, catalog: _Catalog, tables: _Tables, seed: int, chunk_size: int
) -> dict[str, Any]:
    """Generate user blocks in order and write them in chunks of >= chunk_size rows."""
    num_users = len(users.segment)
    num_blocks = -(-num_users // USERS_PER_BLOCK)
    user_width = _id_width(num_users, 7)
    item_width = _id_width(len(catalog.category), 8)
    split_names = pa.array(SPLIT_NAMES, pa.string())
    split_counts = np.zeros(len(SPLIT_NAMES), np.int64)
    per_user = np.zeros(num_users, np.int64)
    shortfall = duplicates = 0
    pending: list[_EventBlock] = []
    pending_rows = rows = 0
    started = last_log = time.perf_counter()

    def flush(writer: pq.ParquetWriter) -> None:
        nonlocal pending_rows
        user_index = np.concatenate([b.user_index for b in pending])
        codes = split_codes_for_sorted(user_index)  # chunks hold whole users
        split_counts[:] += np.bincount(codes, minlength=len(SPLIT_NAMES))
        batch = pa.record_batch(
            [
                _fixed_width_ids("u", user_index, user_width),
                _fixed_width_ids("i", np.concatenate([b.item_index for b in pending]), item_width),
                pa.array(np.concatenate([b.timestamp for b in pending]), pa.int64()),
                _take(split_names, codes),
            ],
            schema=INTERACTIONS_ARROW_SCHEMA,
        )
        writer.write_batch(batch, row_group_size=max(len(user_index), 1))
        pending.clear()
        pending_rows = 0

    with pq.ParquetWriter(path, INTERACTIONS_ARROW_SCHEMA) as writer:
        for block in range(num_blocks):
            events = _interaction_block(block, users, catalog, tables, seed)
            lo = block * USERS_PER_BLOCK
            per_user[lo : lo + USERS_PER_BLOCK] = np.bincount(
                events.user_index - lo, minlength=min(USERS_PER_BLOCK, num_users - lo)
            )
            rows += len(events.user_index)
            shortfall += events.shortfall
            duplicates += events.duplicate_draws
            pending.append(events)
            pending_rows += len(events.user_index)
            if pending_rows >= chunk_size or block == num_blocks - 1:
                flush(writer)
            now = time.perf_counter()
            if now - last_log > 10.0 or block == num_blocks - 1:
                last_log = now
                done = min(num_users, (block + 1) * USERS_PER_BLOCK)
                logger.info(
                    "interactions: %d/%d users, %d rows, %.1f s",
                    *(done, num_users, rows, now - started),
                )
    total = int(split_counts.sum())
    return {
        "interactions": {
            "total": total,
            **dict(zip(SPLIT_NAMES, split_counts.tolist(), strict=True)),
        },
        "interactions_per_user": {
            "min": int(per_user.min()),
            "median": float(np.median(per_user)),
            "mean": round(total / num_users, 3),
            "max": int(per_user.max()),
        },
        "shortfall": shortfall,
        "duplicate_draws": duplicates,
    }


def _ranges(total: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, total, size):
        yield lo, min(total, lo + size)
