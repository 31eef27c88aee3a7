"""The tower ablation (`retrieval ablate`): every tower arrangement x cross variant trained
under one budget, reported as test recall, parameters and FLOPs, mean ± std over seeds.

- `training.ablation.plan`: the variants, their configs and costs, parameter matching;
- `training.ablation.run`: the resumable runs and `run_ablation`, the whole job;
- `training.ablation.report`: report.json's aggregates and report.md;
- `training.ablation.plots`: the PNG plots.

The command line is `training.ablate`.
"""

from training.ablation.plan import (
    BASE_KS,
    BIG_CATALOG,
    DEFAULT_ARRANGEMENTS,
    DEFAULT_CROSS,
    REFERENCE,
    CostModel,
    Variant,
    fit_knob_to_params,
    headline_k,
    knob_for,
    match_variant_params,
    model_costs,
    plan_variants,
    report_ks,
    variant_config,
)
from training.ablation.plots import write_plots
from training.ablation.report import build_report, format_report_markdown, mean_std
from training.ablation.run import RESULT_FILE, run_ablation, run_dir_of, run_one

__all__ = [
    "BASE_KS",
    "BIG_CATALOG",
    "DEFAULT_ARRANGEMENTS",
    "DEFAULT_CROSS",
    "REFERENCE",
    "RESULT_FILE",
    "CostModel",
    "Variant",
    "build_report",
    "fit_knob_to_params",
    "format_report_markdown",
    "headline_k",
    "knob_for",
    "match_variant_params",
    "mean_std",
    "model_costs",
    "plan_variants",
    "report_ks",
    "run_ablation",
    "run_dir_of",
    "run_one",
    "variant_config",
    "write_plots",
]
