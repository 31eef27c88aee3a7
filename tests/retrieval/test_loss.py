"""RetrievalTask: hand-computed logits and losses, mixed negatives, temperature, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retrieval.loss import RetrievalTask, StreamingFrequencyEstimator

LN2 = math.log(2.0)


def _toy_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """3x3 batch; item ids [4, 7, 4]: rows 0 and 2 share a positive (accidental hits)."""
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    item_ids = torch.tensor([4, 7, 4])
    # Train counts of the 8-item catalog, total 12: p(4) = 4/12 = 1/3, p(7) = 2/12 = 1/6.
    counts = torch.tensor([1.0, 1.0, 1.0, 1.0, 4.0, 1.0, 1.0, 2.0])
    return query, items, item_ids, counts


def test_logq_and_accidental_hits_match_hand_computed_logits() -> None:
    query, items, item_ids, counts = _toy_batch()
    task = RetrievalTask(temperature=0.5, item_frequencies=counts, mask_accidental_hits=True)
    # q @ items.T = [[1, 0, 1], [0, 1, 1], [1, 1, 2]]; / 0.5 -> [[2, 0, 2], [0, 2, 2], [2, 2, 4]].
    # logQ = log(C * p_j) with C = 3: id 4 -> log(3 * 1/3) = 0, id 7 -> log(3 * 1/6) = -ln 2.
    # Subtracting it adds ln 2 to column 1. Accidental hits: row 0's positive id 4 also sits
    # in column 2, row 2's positive id 4 also in column 0 -> -inf.
    inf = float("inf")
    expected = torch.tensor(
        [
            [2.0, LN2, -inf],
            [0.0, 2.0 + LN2, 2.0],
            [-inf, 2.0 + LN2, 4.0],
        ]
    )
    logits = task.logits(query, items, item_ids=item_ids)
    torch.testing.assert_close(logits, expected)

    # Cross-entropy on the diagonal, by hand:
    #   row 0: -log(e^2 / (e^2 + e^ln2))          = log(1 + 2 e^-2)
    #   row 1: -log(e^(2+ln2) / (e^0 + e^(2+ln2) + e^2)) = log(1 + e^-2 / 2 + 1 / 2)
    #   row 2: -log(e^4 / (e^(2+ln2) + e^4))      = log(1 + 2 e^-2)
    e2 = math.exp(-2.0)
    rows = [math.log(1 + 2 * e2), math.log(1 + e2 / 2 + 0.5), math.log(1 + 2 * e2)]
    loss = task.loss(query, items, item_ids=item_ids)
    assert loss.item() == pytest.approx(sum(rows) / 3, rel=1e-6)

    # Per-call per-draw log-probabilities give the same logits as the table.
    log_p = torch.log(torch.tensor([1 / 3, 1 / 6, 1 / 3]))
    torch.testing.assert_close(task.logits(query, items, item_ids, item_log_q=log_p), expected)


def test_without_masking_duplicates_stay_negatives() -> None:
    query, items, item_ids, counts = _toy_batch()
    task = RetrievalTask(temperature=0.5, item_frequencies=counts, mask_accidental_hits=False)
    logits = task.logits(query, items, item_ids=item_ids)
    assert logits[0, 2].item() == pytest.approx(2.0)  # 2 - log(1): not masked
    assert torch.isfinite(logits).all()


def test_loss_equals_reference_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    items = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    tau = 0.2
    task = RetrievalTask(temperature=tau, logq_correction=False, mask_accidental_hits=False)
    loss = task.loss(query, items)
    # Reference: mean_i [ -s_ii + log sum_j exp(s_ij) ], s = q @ items.T / tau, written out.
    reference = 0.0
    for i in range(4):
        scores = [float(query[i] @ items[j]) / tau for j in range(4)]
        reference += -scores[i] + math.log(sum(math.exp(s) for s in scores))
    assert loss.item() == pytest.approx(reference / 4, rel=1e-10)


def test_sample_weight_weights_rows_and_divides_by_batch_size() -> None:
    query, items, item_ids, counts = _toy_batch()
    task = RetrievalTask(temperature=0.5, item_frequencies=counts)
    per_row = -F.log_softmax(task.logits(query, items, item_ids), dim=1).diagonal()
    weight = torch.tensor([1.0, 0.0, 2.0])
    loss = task.loss(query, items, item_ids, sample_weight=weight)
    assert loss.item() == pytest.approx((per_row[0] + 2 * per_row[2]).item() / 3, rel=1e-6)
    with pytest.raises(ValueError, match="`sample_weight`"):
        task.loss(query, items, item_ids, sample_weight=torch.tensor([1.0, -1.0, 1.0]))


def test_mixed_negatives_shape_logq_and_accidental_hits() -> None:
    gen = torch.Generator().manual_seed(1)
    num_items, batch, extra = 10, 2, 3
    task = RetrievalTask(
        temperature=0.5,
        item_frequencies=torch.ones(num_items),  # uniform: p_j = 1/10
        num_extra_negatives=extra,
    )
    query = torch.randn(batch, 4, generator=gen)
    items = torch.randn(batch, 4, generator=gen)
    extra_emb = torch.randn(extra, 4, generator=gen)
    item_ids = torch.tensor([1, 2])
    extra_ids = torch.tensor([2, 5, 1])  # 2 is row 1's positive, 1 is row 0's
    logits = task.logits(
        query, items, item_ids=item_ids, extra_item_emb=extra_emb, extra_item_ids=extra_ids
    )
    assert logits.shape == (batch, batch + extra)
    # In-batch columns: expected count C * p = 2/10; extra columns: B'/N = 3/10.
    torch.testing.assert_close(logits[:, :batch], query @ items.T / 0.5 - math.log(0.2))
    raw_extra = query @ extra_emb.T / 0.5 - math.log(0.3)
    expected_extra = raw_extra.clone()
    expected_extra[0, 2] = expected_extra[1, 0] = float("-inf")  # accidental hits
    torch.testing.assert_close(logits[:, batch:], expected_extra)

    # An explicit per-draw extra_log_q of log(1/N) is the default.
    explicit = task.logits(
        query,
        items,
        item_ids=item_ids,
        extra_item_emb=extra_emb,
        extra_item_ids=extra_ids,
        extra_log_q=torch.full((extra,), -math.log(num_items)),
    )
    torch.testing.assert_close(explicit, logits)

    sampled = task.sample_extra_negative_ids(generator=gen)
    assert sampled.shape == (extra,) and sampled.dtype == torch.int64
    assert int(sampled.min()) >= 0 and int(sampled.max()) < num_items

    with pytest.raises(ValueError, match="`extra_item_emb`"):
        task.logits(query, items, item_ids=item_ids)
    with pytest.raises(ValueError, match="`extra_item_emb`"):
        task.logits(query, items, item_ids, extra_item_emb=extra_emb[:2], extra_item_ids=extra_ids)


def test_positive_offset_rows_equal_the_full_batch_rows() -> None:
    """A rank's local rows against the global pool equal those rows of the full batch."""
    gen = torch.Generator().manual_seed(2)
    query, items = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    item_ids = torch.tensor([0, 3, 3, 1, 0, 2])
    task = RetrievalTask(temperature=0.1, item_frequencies=torch.tensor([3.0, 1.0, 1.0, 2.0]))
    full = task.logits(query, items, item_ids)
    local = task.logits(query[3:], items, item_ids, positive_offset=3)
    torch.testing.assert_close(local, full[3:])
    per_rank = [
        task.loss(query[r * 3 : r * 3 + 3], items, item_ids, positive_offset=r * 3) for r in (0, 1)
    ]
    torch.testing.assert_close((per_rank[0] + per_rank[1]) / 2, task.loss(query, items, item_ids))
    with pytest.raises(ValueError, match="`positive_offset`"):
        task.logits(query[3:], items, item_ids, positive_offset=4)


def test_learned_temperature_gets_gradient_and_is_clamped() -> None:
    query, items, item_ids, counts = _toy_batch()
    task = RetrievalTask(
        temperature=0.5,
        learn_temperature=True,
        temperature_range=(0.01, 1.0),
        item_frequencies=counts,
    )
    assert [name for name, _ in task.named_parameters()] == ["log_temperature"]
    task.loss(query, items, item_ids).backward()
    assert task.log_temperature is not None and task.log_temperature.grad is not None
    assert task.log_temperature.grad.abs().item() > 0
    with torch.no_grad():
        task.log_temperature.fill_(5.0)  # e^5 > 1.0, clamped
    assert task.temperature.item() == pytest.approx(1.0)


def test_fixed_temperature_has_no_parameters() -> None:
    task = RetrievalTask(temperature=0.05, logq_correction=False)
    assert list(task.parameters()) == []
    assert task.temperature.item() == pytest.approx(0.05)


def test_large_logits_stay_finite() -> None:
    query = torch.full((3, 4), 100.0)
    items = torch.full((3, 4), 100.0)
    task = RetrievalTask(temperature=1e-3, logq_correction=False, mask_accidental_hits=False)
    loss = task.loss(query, items)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(math.log(3), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"temperature": 0.0, "logq_correction": False}, "`temperature`"),
        ({"temperature": -1.0, "logq_correction": False}, "`temperature`"),
        ({"temperature": float("nan"), "logq_correction": False}, "`temperature`"),
        ({"logq_correction": True}, "`logq_correction=True`"),
        ({"logq_correction": False, "item_frequencies": torch.ones(3)}, "`item_frequencies`"),
        (
            {
                "item_frequencies": torch.ones(3),
                "frequency_estimator": StreamingFrequencyEstimator(8),
            },
            "`frequency_estimator`",
        ),
        ({"logq_correction": False, "num_extra_negatives": -1}, "`num_extra_negatives`"),
        ({"logq_correction": False, "num_extra_negatives": 2}, "`num_items`"),
        (
            {"frequency_estimator": StreamingFrequencyEstimator(8), "num_extra_negatives": 2},
            "`num_items`",
        ),
        ({"item_frequencies": torch.ones(3), "num_items": 4}, "`num_items`"),
        ({"item_frequencies": torch.tensor([1.0, -1.0])}, "`item_frequencies`"),
        ({"item_frequencies": torch.zeros(3)}, "`item_frequencies`"),
        (
            {"learn_temperature": True, "temperature_range": (0.5, 0.1), "logq_correction": False},
            "`temperature_range`",
        ),
        (
            {"learn_temperature": True, "temperature": 2.0, "logq_correction": False},
            "`temperature`",
        ),
    ],
)
def test_invalid_combinations_raise_naming_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        RetrievalTask(**kwargs)


def test_call_time_errors_name_the_argument() -> None:
    query, items, item_ids, counts = _toy_batch()
    task = RetrievalTask(temperature=0.5, item_frequencies=counts)
    with pytest.raises(ValueError, match="`item_ids`"):
        task.loss(query, items)
    with pytest.raises(ValueError, match="`item_ids`"):
        task.loss(query, items, item_ids.int())
    with pytest.raises(ValueError, match="`item_ids`"):
        task.loss(query, items, torch.tensor([4, 7, 8]))  # row 8 outside the 8-item table
    with pytest.raises(ValueError, match="`extra_item_emb`"):
        task.loss(query, items, item_ids, extra_item_ids=item_ids)
    no_logq = RetrievalTask(temperature=0.5, logq_correction=False)
    with pytest.raises(ValueError, match="`item_log_q`"):
        no_logq.loss(query, items, item_ids, item_log_q=torch.zeros(3))


def test_zero_counts_are_lifted_to_the_rarest_seen_item() -> None:
    task = RetrievalTask(temperature=1.0, item_frequencies=torch.tensor([0.0, 1.0, 3.0]))
    assert task.item_log_probability is not None
    # Counts become [1, 1, 3], total 5.
    torch.testing.assert_close(task.item_log_probability, torch.log(torch.tensor([0.2, 0.2, 0.6])))


def test_streaming_estimator_tracks_intervals_and_takes_max_over_hashes() -> None:
    # One slot per hash and one hash: both items collide, the shared slot looks like every step.
    collided = StreamingFrequencyEstimator(num_buckets=1, num_hashes=1, learning_rate=0.2)
    # Many hashes over 64 slots: at least one hash separates the two items.
    separated = StreamingFrequencyEstimator(num_buckets=64, num_hashes=4, learning_rate=0.2)
    for step in range(100):
        ids = torch.tensor([1, 2]) if step % 4 == 0 else torch.tensor([1])
        collided.update(ids)
        separated.update(ids)
    ids = torch.tensor([1, 2, 3])
    torch.testing.assert_close(collided.expected_count(ids)[:2], torch.tensor([1.0, 1.0]))
    # Item 2: first sighting (step 1) sets B = 1; each of its 24 later sightings, 4 steps
    # apart, does B <- 0.8 B + 0.2 * 4, so B = 4 - 3 * 0.8^24.
    expected_interval = 4.0 - 3.0 * 0.8**24
    torch.testing.assert_close(
        separated.expected_count(ids)[:2], torch.tensor([1.0, 1.0 / expected_interval])
    )
    # Item 3 was never seen: read as once in all 100 steps.
    assert separated.expected_count(ids)[2].item() == pytest.approx(0.01)
    assert int(separated.step) == 100


def test_estimator_is_updated_by_training_loss_only() -> None:
    query, items, item_ids, _ = _toy_batch()
    estimator = StreamingFrequencyEstimator(num_buckets=32)
    task = RetrievalTask(temperature=0.5, frequency_estimator=estimator)
    task.logits(query, items, item_ids)
    assert int(estimator.step) == 0
    with pytest.raises(ValueError, match="`positive_offset`"):
        task.loss(query, items, item_ids, positive_offset=1)
    assert int(estimator.step) == 0  # a rejected call changes nothing
    task.loss(query, items, item_ids)
    assert int(estimator.step) == 1
    task.eval()
    task.loss(query, items, item_ids)
    assert int(estimator.step) == 1
    # After one step every seen item reads 1 occurrence per step: log 1 = 0, so logQ is a no-op.
    plain = RetrievalTask(temperature=0.5, logq_correction=False, mask_accidental_hits=True)
    torch.testing.assert_close(
        task.logits(query, items, item_ids), plain.logits(query, items, item_ids)
    )
    # The estimator's buffers travel with the task's state.
    assert "frequency_estimator.interval" in task.state_dict()


def test_catalog_loss_is_the_exact_softmax_over_every_item() -> None:
    task = RetrievalTask(temperature=0.5, logq_correction=False, full_catalog=True)
    gen = torch.Generator().manual_seed(0)
    queries, catalog = torch.randn(3, 4, generator=gen), torch.randn(7, 4, generator=gen)
    positives = torch.tensor([6, 0, 6])
    # Reference: -log(exp(s_ip / tau) / sum_j exp(s_ij / tau)), averaged over the rows.
    scores = queries @ catalog.T / 0.5
    expected = -(scores[torch.arange(3), positives] - torch.logsumexp(scores, dim=1)).mean()
    torch.testing.assert_close(task.catalog_loss(queries, catalog, positives), expected)
    with pytest.raises(ValueError, match=r"`item_ids` must be item rows in \[0, 7\)"):
        task.catalog_loss(queries, catalog, torch.tensor([0, 1, 7]))
    with pytest.raises(ValueError, match=r"`item_ids` must have shape \(3,\)"):
        task.catalog_loss(queries, catalog, torch.tensor([0, 1]))


def test_full_catalog_refuses_sampling_corrections() -> None:
    with pytest.raises(ValueError, match="`full_catalog=True` scores every item"):
        RetrievalTask(full_catalog=True, item_frequencies=torch.ones(4))
    with pytest.raises(ValueError, match="`num_extra_negatives=0`"):
        RetrievalTask(full_catalog=True, logq_correction=False, num_extra_negatives=2, num_items=4)
