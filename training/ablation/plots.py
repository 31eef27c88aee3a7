"""The ablation's plots: recall_at_k.png (mean recall@K per variant, absolute and relative
to the reference variant) and recall_vs_flops.png (headline recall against FLOPs)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.ablation.plan import REFERENCE
from training.ablation.report import format_count

if TYPE_CHECKING:
    from matplotlib.colors import Colormap


def _color(colormap: Colormap, index: int) -> Any:
    """tab20: ten distinct dark hues first, then their light partners."""
    return colormap((2 * index) % 20 + (2 * index // 20) % 2)


def write_plots(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """recall_at_k.png and recall_vs_flops.png (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    setup = report["setup"]
    ks = setup["ks"]
    headline = setup["headline"]
    paths: dict[str, str] = {}

    variants = report["variants"]
    reference = next(
        (v for v in variants if (v["arrangement"], v["cross"]) == REFERENCE), variants[0]
    )
    colors = plt.get_cmap("tab20")
    markers = "osD^v<>ph*"
    fig, (absolute, relative) = plt.subplots(1, 2, figsize=(13, 5))
    for index, entry in enumerate(variants):
        style = {
            "marker": markers[index % len(markers)],
            "color": _color(colors, index),
            "capsize": 3,
            "label": entry["variant"],
        }
        means = [entry[f"recall@{k}"]["mean"] for k in ks]
        stds = [entry[f"recall@{k}"]["std"] for k in ks]
        absolute.errorbar(ks, means, yerr=stds, **style)
        base = [reference[f"recall@{k}"]["mean"] for k in ks]
        relative.errorbar(
            ks,
            [100 * (m / b - 1) if b else 0.0 for m, b in zip(means, base, strict=True)],
            yerr=[100 * s / b if b else 0.0 for s, b in zip(stds, base, strict=True)],
            **style,
        )
    for ax in (absolute, relative):
        ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("K")
        ax.grid(True, alpha=0.3)
    absolute.set_ylabel("test recall@K (mean ± std over seeds)")
    absolute.set_title("Recall@K per variant")
    relative.axhline(0.0, color="black", linewidth=0.8)
    relative.set_ylabel(f"recall@K vs {reference['variant']} (%)")
    relative.set_title(f"Relative to {reference['variant']}")
    relative.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out_dir / "recall_at_k.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths["recall@K per variant"] = str(path)

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for index, entry in enumerate(variants):
        stat = entry[headline]
        flops = entry["costs"]["flops"]
        ax.errorbar(
            [flops],
            [stat["mean"]],
            yerr=[stat["std"]],
            marker=markers[index % len(markers)],
            color=_color(colors, index),
            capsize=3,
        )
        ax.annotate(
            entry["variant"],
            (flops, stat["mean"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    flops = [entry["costs"]["flops"] for entry in report["variants"]]
    if max(flops) >= 10 * min(flops):
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_count(int(value))))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("FLOPs per example (query + item tower, forward)")
    ax.set_ylabel(f"test {headline} (mean ± std)")
    ax.set_title(f"{headline} vs FLOPs")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = out_dir / "recall_vs_flops.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths[f"{headline} vs FLOPs"] = str(path)
    return paths
