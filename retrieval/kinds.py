"""The names of the model's and the evaluation's variants, without importing torch.

Configs, command lines and reports name tower arrangements, cross-layer kinds, history
poolings and baselines; they read the names from here, so that parsing a config or
printing `retrieval --help` does not load the model code. `retrieval.layers`,
`retrieval.towers` and `retrieval.evaluation.baselines` implement what the names mean.

>>> ARRANGEMENTS, CROSS_KINDS
(('parallel', 'stacked', 'deep', 'cross'), ('full', 'lowrank', 'mix', 'masked'))
"""

from __future__ import annotations

from typing import Literal, get_args

CrossKind = Literal["full", "lowrank", "mix", "masked"]
CROSS_KINDS: tuple[str, ...] = get_args(CrossKind)

Arrangement = Literal["parallel", "stacked", "deep", "cross"]
ARRANGEMENTS: tuple[str, ...] = get_args(Arrangement)

HistoryPooling = Literal["mean", "position"]
HISTORY_POOLINGS: tuple[str, ...] = get_args(HistoryPooling)

BASELINES = ("popularity", "ease", "als")  # what `eval.baselines` may name
