"""The retrieval loss: in-batch sampled softmax with logQ correction, accidental-hit masking
and mixed negatives. The towers only embed; `RetrievalTask` owns everything about the loss.

Row i of a batch is a (query, positive item) pair. Every query is scored against a shared
candidate pool: the batch's items (all ranks' items under DDP) plus, optionally, B' extra
items sampled uniformly from the catalog (mixed negative sampling)::

    logit[i, j] = <q_i, c_j> / temperature - log E[count of c_j in the pool]   (logQ)
    logit[i, j] = -inf   if id(c_j) == id(positive_i) and c_j is not row i's own positive
    loss        = mean_i  w_i * -log_softmax(logit[i])[positive column of i]

logQ convention (one scale for every candidate source). In-batch items are draws from the
training interaction stream, so item j lands in a pool of C in-batch items with expected
count C * p_j, where p_j is its per-draw (train frequency) probability; the B' extra
negatives are B' uniform draws with replacement from N catalog items, expected count B'/N.
The correction subtracts the log of this *expected count*: ``log(C * p_j)`` for in-batch
columns and ``log(B' / N)`` for extra columns. Per-draw log-probabilities given by a caller
(``item_log_q``, ``extra_log_q``) are converted by adding ``log(C)`` or ``log(B')``. Without
extra negatives the ``log(C)`` is a constant shift of every logit and cancels in the
softmax; with them it is what puts the two sources on one scale (Yang et al. 2020 §3).
The correction is applied to every column, the positive included (Yi et al. 2019, eq. 3).

Example (a 2x2 batch; no logQ; the loss is plain cross-entropy over the batch):
    >>> import torch
    >>> task = RetrievalTask(temperature=1.0, logq_correction=False)
    >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> task.logits(q, q, item_ids=torch.tensor([3, 7]))
    tensor([[1., 0.],
            [0., 1.]])
    >>> round(task.loss(q, q, item_ids=torch.tensor([3, 7])).item(), 4)  # log(1 + e^-1)
    0.3133
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RetrievalTask", "StreamingFrequencyEstimator"]

# Mersenne prime 2^31 - 1: modulus of the universal hash family ((a * x + b) mod P) mod M.
_HASH_PRIME = 2_147_483_647


class StreamingFrequencyEstimator(nn.Module):
    """Streaming estimate of how often each item appears in a training batch, for catalogs
    too large (or too fresh) for a table of train counts.

    Yi et al. 2019, "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
    Recommendations", §4 (Algorithm 2 and the multiple-hashing variant). Each item id is
    hashed into `num_buckets` slots by `num_hashes` independent hash functions. Per slot the
    estimator keeps ``A`` (the last step the slot was seen) and ``B`` (a moving average of the
    number of steps between two sightings). At step t, for every slot hit by the batch::

        B <- (1 - alpha) * B + alpha * (t - A);    A <- t

    ``1 / B`` estimates the expected number of times the item appears in one step's pool.
    Hash collisions only make a slot look more frequent (shorter gaps), so with several
    hashes the estimate uses the largest ``B`` (the least-collided slot).

    Conventions of this implementation:
      - a slot's first sighting at step t sets ``B = t`` (seen once in t steps) instead of
        averaging with an arbitrary initial value; a never-seen slot reads as ``B = max(t, 1)``.
      - an id appearing several times in one update counts once (the paper's update), so the
        estimate saturates at 1 per step for items present in nearly every batch.
      - `update` is called once per training step with the whole candidate pool's ids (the
        all-gathered ids under DDP, so every rank's estimator sees the same stream and agrees).

    Args:
        num_buckets: slots per hash function (memory: 16 bytes per slot per hash).
        num_hashes: independent hash functions; the estimate takes the max interval.
        learning_rate: ``alpha`` of the moving average, in (0, 1].
        seed: seeds the hash functions (fixed so that estimates are reproducible).

    Shapes: `item_ids` is ``[num_ids]`` int64; estimates are ``[num_ids]`` float32.

    Example (item 5 in every step, item 9 every other step, over 200 steps):
        >>> est = StreamingFrequencyEstimator(num_buckets=1024, learning_rate=0.1)
        >>> for step in range(200):
        ...     est.update(torch.tensor([5, 9]) if step % 2 else torch.tensor([5]))
        >>> [round(v, 2) for v in est.expected_count(torch.tensor([5, 9])).tolist()]
        [1.0, 0.5]
    """

    hash_a: Tensor  # (H, 1) multipliers of the hash functions
    hash_b: Tensor  # (H, 1) offsets of the hash functions
    step: Tensor  # () int64, number of `update` calls so far
    last_step: Tensor  # (H, num_buckets) int64, A: last step each slot was seen (0: never)
    interval: Tensor  # (H, num_buckets) float32, B: moving-average gap (0: never seen)

    def __init__(
        self,
        num_buckets: int = 1 << 20,
        num_hashes: int = 1,
        learning_rate: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_buckets < 1:
            raise ValueError(f"`num_buckets` must be >= 1; got {num_buckets}")
        if num_hashes < 1:
            raise ValueError(f"`num_hashes` must be >= 1; got {num_hashes}")
        if not 0.0 < learning_rate <= 1.0:
            raise ValueError(f"`learning_rate` must be in (0, 1]; got {learning_rate}")
        self.num_buckets = num_buckets
        self.num_hashes = num_hashes
        self.learning_rate = learning_rate
        generator = torch.Generator().manual_seed(seed)
        hash_a = torch.randint(1, _HASH_PRIME, (num_hashes, 1), generator=generator)
        hash_b = torch.randint(0, _HASH_PRIME, (num_hashes, 1), generator=generator)
        self.register_buffer("hash_a", hash_a)  # (H, 1)
        self.register_buffer("hash_b", hash_b)  # (H, 1)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last_step", torch.zeros(num_hashes, num_buckets, dtype=torch.int64))
        self.register_buffer("interval", torch.zeros(num_hashes, num_buckets))  # 0: unseen

    def _slots(self, item_ids: Tensor) -> Tensor:
        """Slot of every id under every hash function: ``[num_hashes, num_ids]``."""
        if item_ids.dim() != 1 or item_ids.dtype != torch.int64:
            raise ValueError(
                f"`item_ids` must be 1-d int64; got shape {tuple(item_ids.shape)}, {item_ids.dtype}"
            )
        x = torch.remainder(item_ids.to(self.hash_a.device), _HASH_PRIME)  # (n,), < 2^31
        return ((self.hash_a * x + self.hash_b) % _HASH_PRIME) % self.num_buckets  # (H, n)

    @torch.no_grad()
    def update(self, item_ids: Tensor) -> None:
        """Advance one step and record the ids seen in it (``[num_ids]`` int64)."""
        self.step += 1
        slots = self._slots(torch.unique(item_ids))  # (H, u)
        for h in range(self.num_hashes):
            # Duplicated slots (collisions) read the same old state and write the same value.
            slot = torch.unique(slots[h])
            last = self.last_step[h, slot]
            gap = (self.step - last).to(self.interval.dtype)
            old = self.interval[h, slot]
            averaged = (1.0 - self.learning_rate) * old + self.learning_rate * gap
            self.interval[h, slot] = torch.where(last == 0, gap, averaged)
            self.last_step[h, slot] = self.step

    @torch.no_grad()
    def expected_count(self, item_ids: Tensor) -> Tensor:
        """Estimated occurrences per step of each id, ``1 / B``, in (0, 1]."""
        slots = self._slots(item_ids)  # (H, n)
        interval = torch.gather(self.interval, 1, slots)  # (H, n)
        unseen = max(int(self.step), 1)
        interval = torch.where(interval > 0, interval, torch.full_like(interval, unseen))
        return 1.0 / interval.max(dim=0).values.clamp_min(1.0)

    def log_expected_count(self, item_ids: Tensor) -> Tensor:
        """``log(1 / B)`` per id: the logQ term of an in-batch candidate (``<= 0``)."""
        return torch.log(self.expected_count(item_ids))


class RetrievalTask(nn.Module):
    """In-batch sampled-softmax retrieval loss with logQ correction, accidental-hit masking
    and mixed negatives.

    Papers: Yi et al. 2019 (in-batch softmax with sampling-bias / logQ correction and the
    streaming frequency estimator), Yang et al. 2020 "Mixed Negative Sampling for Learning
    Two-tower Neural Networks in Recommendations" (extra uniformly sampled negatives shared
    by the batch). For query i with positive column p(i) = positive_offset + i::

        s[i, j]    = <q_i, c_j> / tau                              c: in-batch + extra items
        s[i, j]   -= log(C * p_j)       (in-batch j)     or  log(B' / N)  (extra j)   if logQ
        s[i, j]    = -inf   if id(c_j) == id(c_p(i)) and j != p(i)          if masking
        loss       = sum_i w_i * (-log_softmax(s[i])[p(i)]) / B

    See the module docstring for why both logQ terms are log expected counts.

    Temperature: fixed, or learned as ``log_tau`` (a parameter) with
    ``tau = exp(clamp(log_tau, log(min), log(max)))``; outside the range the gradient is 0.

    DDP: pass the all-gathered candidate pool (`retrieval`'s caller uses
    `training.distributed.gather_with_grad`) as `item_emb` / `item_ids` with
    ``positive_offset = rank * B``; each rank scores only its own B queries. Extra negatives
    stay per rank (not gathered): every rank samples its own B'.

    Args:
        temperature: tau > 0; the starting value when learned.
        learn_temperature: learn tau as a clamped log-parameter.
        temperature_range: ``(min, max)`` clamp of the learned tau, ``0 < min < max``.
        logq_correction: subtract the log expected count of every candidate from its logit.
        item_frequencies: ``[num_items]`` train counts (or probabilities) per item row;
            normalised to per-draw probabilities. A zero count is raised to the smallest
            non-zero one so the correction stays finite.
        frequency_estimator: streaming estimator used instead of `item_frequencies`;
            updated with the pool's ids on every `loss` call in training mode.
        mask_accidental_hits: drop candidates with the row positive's id (other than the
            positive itself) from the softmax; also among extra negatives.
        num_extra_negatives: B', extra uniform negatives per step (0: in-batch only).
        num_items: catalog size N; needed for extra negatives (sampling and ``log(B'/N)``).
            Inferred from `item_frequencies` when given.
        full_catalog: train with `catalog_loss` (the exact softmax over all N items) instead
            of `loss`; refused together with logQ or extra negatives, which correct sampling.

    Shapes: ``query_emb [B, D]``, ``item_emb [C, D]`` (C = B, or world_size * B gathered),
    ``item_ids [C]`` int64, ``extra_item_emb [B', D]``, ``extra_item_ids [B']``; logits are
    ``[B, C + B']``; the loss is a scalar.

    Example (mixed negatives: 2 queries, 2 in-batch items, 3 extra items, catalog of 10):
        >>> task = RetrievalTask(temperature=0.1, logq_correction=True,
        ...                      item_frequencies=torch.ones(10), num_extra_negatives=3)
        >>> g = torch.Generator().manual_seed(0)
        >>> extra_ids = task.sample_extra_negative_ids(generator=g)
        >>> q, items, extra = torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4)
        >>> task.logits(q, items, item_ids=torch.tensor([1, 2]), extra_item_emb=extra,
        ...             extra_item_ids=extra_ids).shape
        torch.Size([2, 5])
        >>> RetrievalTask(temperature=0.0)
        Traceback (most recent call last):
        ...
        ValueError: `temperature` must be a finite number > 0; got 0.0
    """

    item_log_probability: Tensor | None

    def __init__(
        self,
        temperature: float = 0.05,
        learn_temperature: bool = False,
        temperature_range: tuple[float, float] = (1e-3, 1.0),
        logq_correction: bool = True,
        item_frequencies: Tensor | None = None,
        frequency_estimator: StreamingFrequencyEstimator | None = None,
        mask_accidental_hits: bool = True,
        num_extra_negatives: int = 0,
        num_items: int | None = None,
        full_catalog: bool = False,
    ) -> None:
        super().__init__()
        if full_catalog and (logq_correction or num_extra_negatives):
            raise ValueError(
                "`full_catalog=True` scores every item, so there is no sampling to correct: "
                f"it needs `logq_correction=False` and `num_extra_negatives=0`; got "
                f"{logq_correction} and {num_extra_negatives}"
            )
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"`temperature` must be a finite number > 0; got {temperature}")
        if learn_temperature:
            low, high = temperature_range
            if not 0 < low < high:
                raise ValueError(
                    f"`temperature_range` must be (min, max) with 0 < min < max; got {temperature_range}"
                )
            if not low <= temperature <= high:
                raise ValueError(
                    f"`temperature` must lie in `temperature_range` {temperature_range} when "
                    f"learned; got {temperature}"
                )
        if logq_correction and item_frequencies is None and frequency_estimator is None:
            raise ValueError(
                "`logq_correction=True` needs a probability source: `item_frequencies` "
                "or `frequency_estimator`; got neither"
            )
        if item_frequencies is not None and frequency_estimator is not None:
            raise ValueError("give one of `item_frequencies` and `frequency_estimator`, not both")
        if not logq_correction and (
            item_frequencies is not None or frequency_estimator is not None
        ):
            raise ValueError(
                "`item_frequencies` / `frequency_estimator` given but `logq_correction=False`"
            )
        if isinstance(num_extra_negatives, bool) or not isinstance(num_extra_negatives, int):
            raise ValueError(f"`num_extra_negatives` must be an int; got {num_extra_negatives!r}")
        if num_extra_negatives < 0:
            raise ValueError(f"`num_extra_negatives` must be >= 0; got {num_extra_negatives}")
        if num_items is not None and num_items < 1:
            raise ValueError(f"`num_items` must be >= 1; got {num_items}")

        log_probability: Tensor | None = None
        if item_frequencies is not None:
            log_probability = _log_probabilities(item_frequencies)
            if num_items is not None and num_items != len(log_probability):
                raise ValueError(
                    f"`num_items` ({num_items}) disagrees with len(`item_frequencies`) "
                    f"({len(log_probability)})"
                )
            num_items = len(log_probability)
        if num_extra_negatives > 0 and num_items is None:
            raise ValueError(
                f"`num_items` (catalog size) is required with `num_extra_negatives` = "
                f"{num_extra_negatives}: extra negatives are sampled uniformly from it"
            )

        self.logq_correction = logq_correction
        self.mask_accidental_hits = mask_accidental_hits
        self.num_extra_negatives = num_extra_negatives
        self.num_items = num_items
        self.full_catalog = full_catalog
        self.learn_temperature = learn_temperature
        self.frequency_estimator = frequency_estimator
        self.register_buffer("item_log_probability", log_probability)  # (N,) or None
        self._fixed_temperature = float(temperature)
        self._log_temperature_range = (
            math.log(temperature_range[0]),
            math.log(temperature_range[1]),
        )
        self.log_temperature: nn.Parameter | None = None
        if learn_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    @property
    def temperature(self) -> Tensor:
        """Current tau as a 0-d tensor (differentiable when learned)."""
        if self.log_temperature is None:
            return torch.tensor(self._fixed_temperature)
        low, high = self._log_temperature_range
        return torch.exp(self.log_temperature.clamp(low, high))

    def sample_extra_negative_ids(
        self, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """``[num_extra_negatives]`` item rows drawn uniformly with replacement from the catalog,
        the sampling the ``log(B'/N)`` correction assumes. The caller embeds them with the
        item tower and passes them as `extra_item_emb` / `extra_item_ids`."""
        if self.num_items is None:
            raise ValueError("`num_items` is unknown: build the task with `num_items`")
        return torch.randint(
            0, self.num_items, (self.num_extra_negatives,), generator=generator, device=device
        )

    def logits(
        self,
        query_emb: Tensor,
        item_emb: Tensor,
        item_ids: Tensor | None = None,
        item_log_q: Tensor | None = None,
        *,
        positive_offset: int = 0,
        extra_item_emb: Tensor | None = None,
        extra_item_ids: Tensor | None = None,
        extra_log_q: Tensor | None = None,
    ) -> Tensor:
        """Corrected, masked logits ``[B, C + B']``; row i's positive is column
        ``positive_offset + i``. Does not update the frequency estimator.

        Args:
            query_emb: ``[B, D]`` query embeddings (local rows under DDP).
            item_emb: ``[C, D]`` in-batch candidate pool (all ranks' items under DDP).
            item_ids: ``[C]`` int64 item rows of the pool; needed for accidental-hit masking
                and for looking up the configured logQ source.
            item_log_q: ``[C]`` per-draw log-probabilities overriding the configured source.
            positive_offset: column of row 0's positive (``rank * B`` under DDP).
            extra_item_emb: ``[B', D]`` extra uniform negatives, B' = `num_extra_negatives`.
            extra_item_ids: ``[B']`` their item rows (needed for masking).
            extra_log_q: ``[B']`` their per-draw log-probabilities; default ``log(1/N)``.
        """
        return self._logits(
            query_emb,
            item_emb,
            item_ids,
            item_log_q,
            positive_offset=positive_offset,
            extra_item_emb=extra_item_emb,
            extra_item_ids=extra_item_ids,
            extra_log_q=extra_log_q,
            update_estimator=False,
        )

    def loss(
        self,
        query_emb: Tensor,
        item_emb: Tensor,
        item_ids: Tensor | None = None,
        item_log_q: Tensor | None = None,
        *,
        positive_offset: int = 0,
        extra_item_emb: Tensor | None = None,
        extra_item_ids: Tensor | None = None,
        extra_log_q: Tensor | None = None,
        sample_weight: Tensor | None = None,
    ) -> Tensor:
        """Scalar loss: ``sum_i w_i * CE_i / B`` (plain mean when `sample_weight` is None).

        Arguments as in `logits`, plus `sample_weight` ``[B]`` (non-negative). With a
        `frequency_estimator` in training mode, the estimator records `item_ids` (after every
        argument is checked) before their logQ is read.
        """
        batch_size = query_emb.shape[0]
        if sample_weight is not None:
            if sample_weight.shape != (batch_size,):
                raise ValueError(
                    f"`sample_weight` must have shape ({batch_size},); got "
                    f"{tuple(sample_weight.shape)}"
                )
            if bool((sample_weight < 0).any()):
                raise ValueError("`sample_weight` must be non-negative")
        logits = self._logits(
            query_emb,
            item_emb,
            item_ids,
            item_log_q,
            positive_offset=positive_offset,
            extra_item_emb=extra_item_emb,
            extra_item_ids=extra_item_ids,
            extra_log_q=extra_log_q,
            update_estimator=self.training,
        )
        labels = torch.arange(batch_size, device=logits.device) + positive_offset  # (B,)
        # log_softmax is stable for large logits; masked -inf columns get probability 0.
        per_row = -F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)  # (B,)
        if sample_weight is None:
            return per_row.mean()
        return (per_row * sample_weight.to(per_row.dtype)).sum() / batch_size

    def catalog_loss(self, query_emb: Tensor, catalog_emb: Tensor, item_ids: Tensor) -> Tensor:
        """Exact softmax over the whole catalog (no sampling, so no logQ and no masking)::

            loss = mean_i -log softmax_j(<q_i, c_j> / tau)[item_ids[i]]

        Practical for small catalogs, where embedding every item each step costs about as
        much as an in-batch step (ml-100k: 1682 items against batches of 1024).

        Args:
            query_emb: ``[B, D]`` query embeddings.
            catalog_emb: ``[N, D]`` every item's embedding, row = item row.
            item_ids: ``[B]`` int64 item row of each query's positive.

        >>> task = RetrievalTask(temperature=1.0, logq_correction=False, full_catalog=True)
        >>> q = torch.tensor([[1.0, 0.0]]); c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> round(task.catalog_loss(q, c, torch.tensor([0])).item(), 4)  # log(1 + e^-1)
        0.3133
        """
        if (
            query_emb.dim() != 2
            or catalog_emb.dim() != 2
            or query_emb.shape[1] != catalog_emb.shape[1]
        ):
            raise ValueError(
                "`query_emb` [B, D] and `catalog_emb` [N, D] must be 2-d with one D; got "
                f"{tuple(query_emb.shape)} and {tuple(catalog_emb.shape)}"
            )
        if item_ids.shape != (query_emb.shape[0],):
            raise ValueError(
                f"`item_ids` must have shape ({query_emb.shape[0]},); got {tuple(item_ids.shape)}"
            )
        if len(item_ids) and (int(item_ids.min()) < 0 or int(item_ids.max()) >= len(catalog_emb)):
            raise ValueError(f"`item_ids` must be item rows in [0, {len(catalog_emb)})")
        logits = query_emb @ catalog_emb.t() / self.temperature.to(query_emb.dtype)  # (B, N)
        return F.cross_entropy(logits, item_ids)

    def _check_arguments(
        self,
        query_emb: Tensor,
        item_emb: Tensor,
        item_ids: Tensor | None,
        item_log_q: Tensor | None,
        positive_offset: int,
        extra_item_emb: Tensor | None,
        extra_item_ids: Tensor | None,
        extra_log_q: Tensor | None,
    ) -> None:
        """Every call-time check, before anything is computed or any state changes."""
        if query_emb.dim() != 2 or item_emb.dim() != 2 or query_emb.shape[1] != item_emb.shape[1]:
            raise ValueError(
                "`query_emb` [B, D] and `item_emb` [C, D] must be 2-d with one D; got "
                f"{tuple(query_emb.shape)} and {tuple(item_emb.shape)}"
            )
        batch_size, num_candidates = query_emb.shape[0], item_emb.shape[0]
        if positive_offset < 0 or positive_offset + batch_size > num_candidates:
            raise ValueError(
                f"`positive_offset` must be in [0, C - B] = [0, {num_candidates - batch_size}]; "
                f"got {positive_offset}"
            )
        _check_ids("item_ids", item_ids, num_candidates)
        _check_vector("item_log_q", item_log_q, num_candidates)
        if item_log_q is not None and not self.logq_correction:
            raise ValueError("`item_log_q` given but the task has `logq_correction=False`")
        needs_ids = self.mask_accidental_hits or (self.logq_correction and item_log_q is None)
        if needs_ids and item_ids is None:
            raise ValueError(
                "`item_ids` is required (accidental-hit masking or logQ lookup is enabled)"
            )
        if item_ids is not None and item_log_q is None and self.item_log_probability is not None:
            num_items = len(self.item_log_probability)
            if bool(((item_ids < 0) | (item_ids >= num_items)).any()):
                raise ValueError(f"`item_ids` must be item rows in [0, {num_items})")

        if extra_item_emb is None:
            if self.num_extra_negatives > 0:
                raise ValueError(
                    f"`extra_item_emb` is required: the task has `num_extra_negatives` = "
                    f"{self.num_extra_negatives}"
                )
            if extra_item_ids is not None or extra_log_q is not None:
                raise ValueError("`extra_item_ids` / `extra_log_q` given without `extra_item_emb`")
            return
        if extra_item_emb.shape != (self.num_extra_negatives, query_emb.shape[1]):
            raise ValueError(
                f"`extra_item_emb` must have shape ({self.num_extra_negatives}, "
                f"{query_emb.shape[1]}) (`num_extra_negatives`, D); got {tuple(extra_item_emb.shape)}"
            )
        _check_ids("extra_item_ids", extra_item_ids, self.num_extra_negatives)
        _check_vector("extra_log_q", extra_log_q, self.num_extra_negatives)
        if extra_log_q is not None and not self.logq_correction:
            raise ValueError("`extra_log_q` given but the task has `logq_correction=False`")
        if self.mask_accidental_hits and extra_item_ids is None:
            raise ValueError("`extra_item_ids` is required for accidental-hit masking")

    def _logits(
        self,
        query_emb: Tensor,
        item_emb: Tensor,
        item_ids: Tensor | None,
        item_log_q: Tensor | None,
        *,
        positive_offset: int,
        extra_item_emb: Tensor | None,
        extra_item_ids: Tensor | None,
        extra_log_q: Tensor | None,
        update_estimator: bool,
    ) -> Tensor:
        self._check_arguments(
            query_emb,
            item_emb,
            item_ids,
            item_log_q,
            positive_offset,
            extra_item_emb,
            extra_item_ids,
            extra_log_q,
        )
        batch_size, num_candidates = query_emb.shape[0], item_emb.shape[0]
        temperature: Tensor | float = self._fixed_temperature  # a float keeps float64 exact
        if self.log_temperature is not None:
            temperature = self.temperature.to(query_emb.device, query_emb.dtype)
        positive_ids = None
        if item_ids is not None:
            positive_ids = item_ids[positive_offset : positive_offset + batch_size]  # (B,)

        logits = query_emb @ item_emb.T / temperature  # (B, C)
        if self.logq_correction:
            log_count = self._in_batch_log_count(
                item_ids, item_log_q, num_candidates, update_estimator
            )  # (C,)
            logits = logits - log_count.to(logits.dtype)[None, :]  # (B, C)
        if self.mask_accidental_hits:
            assert item_ids is not None and positive_ids is not None
            hits = item_ids[None, :] == positive_ids[:, None]  # (B, C)
            rows = torch.arange(batch_size, device=hits.device)
            hits[rows, rows + positive_offset] = False  # the positive itself stays
            logits = logits.masked_fill(hits, float("-inf"))
        if extra_item_emb is None:
            return logits

        extra_logits = query_emb @ extra_item_emb.T / temperature  # (B, B')
        if self.logq_correction:
            assert self.num_items is not None
            if extra_log_q is None:  # uniform draws: per-draw probability 1/N
                extra_log_q = torch.full(
                    (self.num_extra_negatives,), -math.log(self.num_items), device=logits.device
                )
            extra_count = extra_log_q.to(logits.dtype) + math.log(self.num_extra_negatives)
            extra_logits = extra_logits - extra_count[None, :]  # (B, B'): - log(B'/N)
        if self.mask_accidental_hits:
            assert extra_item_ids is not None and positive_ids is not None
            extra_hits = extra_item_ids[None, :] == positive_ids[:, None]  # (B, B')
            extra_logits = extra_logits.masked_fill(extra_hits, float("-inf"))
        return torch.cat([logits, extra_logits], dim=1)  # (B, C + B')

    def _in_batch_log_count(
        self,
        item_ids: Tensor | None,
        item_log_q: Tensor | None,
        num_candidates: int,
        update_estimator: bool,
    ) -> Tensor:
        """log E[count] of every in-batch candidate, ``[C]``: ``log(C * p_j)`` from a
        probability source, ``log(1 / B_j)`` from the streaming estimator."""
        if item_log_q is not None:
            return item_log_q + math.log(num_candidates)
        assert item_ids is not None
        if self.item_log_probability is not None:
            return self.item_log_probability[item_ids] + math.log(num_candidates)
        assert self.frequency_estimator is not None
        if update_estimator:
            self.frequency_estimator.update(item_ids)
        return self.frequency_estimator.log_expected_count(item_ids)


def _log_probabilities(frequencies: Tensor) -> Tensor:
    """Per-draw log-probabilities from counts ``[N]``; zero counts lifted to the rarest seen."""
    freq = torch.as_tensor(frequencies, dtype=torch.float64)
    if freq.dim() != 1 or len(freq) == 0:
        raise ValueError(f"`item_frequencies` must be 1-d and non-empty; got {tuple(freq.shape)}")
    if not bool(torch.isfinite(freq).all()) or bool((freq < 0).any()):
        raise ValueError("`item_frequencies` must be finite and non-negative")
    positive = freq[freq > 0]
    if len(positive) == 0:
        raise ValueError("`item_frequencies` must have at least one non-zero entry")
    freq = freq.clamp_min(positive.min())
    return torch.log(freq / freq.sum()).to(torch.float32)


def _check_ids(name: str, ids: Tensor | None, length: int) -> None:
    if ids is None:
        return
    if ids.shape != (length,) or ids.dtype != torch.int64:
        raise ValueError(
            f"`{name}` must be int64 of shape ({length},); got {ids.dtype} {tuple(ids.shape)}"
        )


def _check_vector(name: str, values: Tensor | None, length: int) -> None:
    if values is not None and values.shape != (length,):
        raise ValueError(f"`{name}` must have shape ({length},); got {tuple(values.shape)}")
