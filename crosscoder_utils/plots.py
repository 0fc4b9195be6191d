"""Every figure of the notebooks, with one palette: a kind of latent and a model have one colour everywhere.

Each function takes numbers (or a crosscoder) and returns a matplotlib figure, saved as a PNG when
``path`` is given. The numeric modules (analysis, normalize, synthetic) never import matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from .analysis import DifferenceTable, Patching, kind_name, random_pair_cosines, relative_decoder_norms
from .config import EXCLUSIVE_SHARE, model_roles
from .crosscoder import CrossCoder
from .methods import over_seeds
from .run import explained_variance_by_model
from .seeds import span
from .synthetic import GroundTruth, Recovery

MODEL_COLORS = ["tab:blue", "tab:red", "tab:orange", "tab:green", "tab:brown"]
"""By model index: the base blue, the (first) fine-tune red."""
KIND_COLORS = {
    "shared": "0.55",
    "base-only": "tab:blue",
    "finetuned-only": "tab:red",
    "changed": "tab:purple",
    "dead": "0.85",
}
"""By latent kind; exclusive kinds take their model's colour."""


def kind_color(kind: str) -> str:
    return KIND_COLORS.get(kind, "tab:orange")


def save(fig, path: str | Path | None):
    if path:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def norm_histograms(norms: torch.Tensor, d_model: int, factors: torch.Tensor | None = None, path=None):
    """Histogram of each model's activation norms ``norms`` [n, n_models], raw and, when ``factors`` are
    given, scaled by them (with the √d_model target)."""
    roles = model_roles(norms.shape[1])
    panels = [("raw", norms)] + ([("normalised", norms * factors)] if factors is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        for m, role in enumerate(roles):
            ax.hist(values[:, m].numpy(), bins=80, alpha=0.6, color=MODEL_COLORS[m], label=role)
        if title == "normalised":
            ax.axvline(d_model**0.5, color="k", ls="--", label="√d_model")
        ax.set(title=f"{title} activation norms", xlabel="L2 norm", ylabel="tokens")
        ax.legend()
    fig.tight_layout()
    return save(fig, path)


def grouped_bars(values: dict[str, dict[str, float]], title: str, ylabel: str, ylim=None, colors=None, path=None):
    """One group of bars per category: ``values`` maps each series to {category: value}."""
    series = list(values)
    categories = list(values[series[0]])
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(6, 3))
    for i, name in enumerate(series):
        positions = [j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))]
        color = colors[i] if colors else None
        ax.bar(positions, [values[name][c] for c in categories], width=width, label=name, color=color)
    ax.set(xticks=range(len(categories)), xticklabels=categories, ylabel=ylabel, title=title, ylim=ylim)
    ax.legend()
    return save(fig, path)


def training_curves(metrics: list[dict], path=None):
    """Over the logged steps: the loss and its terms (log scale: reconstruction L2, the sparsity term λ·penalty,
    the auxiliary loss), L0, explained variance per model (zoomed to the range it spans), the fraction of dead
    latents, and the schedules of λ and of the learning rate."""
    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    terms = {"loss": [m["loss"] for m in metrics], "L2": [m["l2_loss"] for m in metrics]}
    terms["λ·penalty"] = [m["l1_coeff"] * m["penalty"] for m in metrics]
    terms["aux"] = [m["aux_loss"] for m in metrics]
    for label, values in terms.items():
        if any(v > 0 for v in values):
            axes[0, 0].plot(steps, values, label=label)
    axes[0, 0].set(yscale="log", title="loss and its terms", xlabel="step")
    axes[0, 0].legend()
    axes[0, 1].plot(steps, [m["l0_loss"] for m in metrics])
    axes[0, 1].set(title="L0 (active latents per token)", xlabel="step")
    per_model = [explained_variance_by_model(s) for s in metrics]
    for m, role in enumerate(per_model[0]):
        axes[0, 2].plot(steps, [s[role] for s in per_model], label=role, color=MODEL_COLORS[m])
    tail = per_model[len(per_model) // 5 :]  # zoomed to the run after its first fifth, where the curves separate
    values = [v for s in tail for v in s.values()]
    spread = max(values) - min(values)
    axes[0, 2].set(
        title="explained variance per model",
        xlabel="step",
        ylim=(min(values) - 0.2 * spread - 1e-4, min(1.0, max(values) + 0.2 * spread + 1e-4)),
    )
    axes[0, 2].legend()
    axes[1, 0].plot(steps, [m["dead_fraction"] for m in metrics])
    axes[1, 0].set(title="dead latents (fraction)", xlabel="step", ylim=(0, 1))
    axes[1, 1].plot(steps, [m["l1_coeff"] for m in metrics])
    axes[1, 1].set(title="λ (sparsity coefficient)", xlabel="step")
    axes[1, 2].plot(steps, [m["lr"] for m in metrics])
    axes[1, 2].set(title="learning rate", xlabel="step")
    fig.tight_layout()
    return save(fig, path)


def _stacked_relative_norms(groups, labels, colors, exclusive_share: float, ylabel: str, title: str):
    """A log-scale stacked histogram of relative decoder norms ``groups`` with the edges where decoder norms
    alone would label a latent exclusive (the kinds use Latent Scaling where a latent fires)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(groups, bins=np.linspace(0, 1, 51), stacked=True, label=labels, color=colors)
    for edge in (1 - exclusive_share, exclusive_share):
        ax.axvline(edge, color="k", ls="--", lw=0.8)
    xlabel = "relative decoder norm ‖d_finetuned‖ / (‖d_base‖ + ‖d_finetuned‖)"
    ax.set(yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    return fig, ax


def difference_map(table: DifferenceTable, labels: dict[int, str] | None = None, path=None):
    """Every live latent at (relative decoder norm, decoder cosine), coloured by kind, its area by its
    difference_score (the KL between the models where it fires); ``labels`` names some latents on the map."""
    live = table.order
    fig, ax = plt.subplots(figsize=(8, 5))
    size = 4 + 400 * table.difference_score[live] / table.difference_score[live].max().clamp(min=1e-12)
    for kind in dict.fromkeys(table.kind[i] for i in live.tolist()):
        mask = torch.tensor([table.kind[i] == kind for i in live.tolist()])
        ax.scatter(
            table.relative_norm[live][mask],
            table.decoder_cosine[live][mask],
            s=size[mask],
            alpha=0.55,
            color=kind_color(kind),
            label=f"{kind}: {int(mask.sum())}",
            edgecolors="none",
        )
    for latent, text in (labels or {}).items():
        ax.annotate(
            text,
            (float(table.relative_norm[latent]), float(table.decoder_cosine[latent])),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    role = model_roles(max(2, table.model_index + 1))[table.model_index]
    ax.set(
        xlabel=f"relative decoder norm ‖d_{role}‖ / (‖d_base‖ + ‖d_{role}‖)",
        xlim=(-0.02, 1.02),
        ylabel=f"cosine(d_base, d_{role})",
        ylim=(min(-0.1, float(table.decoder_cosine[live].min()) - 0.05), 1.05),
        title="live latents; area: how much the models' predictions differ where the latent fires",
    )
    ax.legend(loc="lower left", fontsize=8, markerscale=0.5)
    return save(fig, path)


def relative_norms(table: DifferenceTable, cc: CrossCoder, exclusive_share: float = EXCLUSIVE_SHARE, path=None):
    """Histogram of the live latents' relative decoder norms, stacked by kind, with the edges where decoder
    norms alone would label a latent exclusive; designated shared latents and each model's dedicated latents
    (when the crosscoder has them) as their own groups."""
    live = torch.zeros(len(table.kind), dtype=torch.bool)
    live[table.order] = True
    free = live & ~cc.tied & (cc.owner == -1)
    groups = [
        (free & torch.tensor([k == kind for k in table.kind]), kind, kind_color(kind))
        for kind in dict.fromkeys(table.kind[i] for i in table.order.tolist())
    ]
    groups += [(live & cc.tied, "designated shared", "tab:green")]
    groups += [
        (live & (cc.owner == m), f"dedicated to {role}", ("navy", "darkred")[m])
        for m, role in enumerate(model_roles(2))
    ]
    groups = [(mask, label, color) for mask, label, color in groups if mask.any()]
    fig, ax = _stacked_relative_norms(
        [table.relative_norm[mask].numpy() for mask, _, _ in groups],
        [f"{label}: {int(mask.sum())}" for mask, label, _ in groups],
        [color for _, _, color in groups],
        exclusive_share,
        "live latents",
        f"relative decoder norms ({table.kind.count('dead')} dead latents left out)",
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return save(fig, path)


def decoder_cosines_histogram(table: DifferenceTable, cc: CrossCoder, path=None):
    """Cosine between the two decoder vectors of the live shared and changed latents (designated shared ones,
    tied by construction, left out), beside random pairs of latents."""
    both = torch.tensor([kind in ("shared", "changed") for kind in table.kind]) & ~cc.tied
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(-1, 1, 81)
    ax.hist(
        table.decoder_cosine[both].numpy(),
        bins=bins,
        density=True,
        alpha=0.7,
        color=kind_color("shared"),
        label=f"live shared and changed latents ({int(both.sum())})",
    )
    ax.hist(
        random_pair_cosines(cc).numpy(),
        bins=bins,
        density=True,
        alpha=0.5,
        color="tab:olive",
        label="random pairs of latents",
    )
    ax.set(xlabel="cosine(d_base, d_finetuned)", ylabel="density", title="decoder directions of latents in both models")
    ax.legend()
    return save(fig, path)


def frequencies(table: DifferenceTable, n_tokens: int, path=None):
    """Firing frequency of the live latents, by kind."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.logspace(np.log10(1 / n_tokens), 0, 50)
    for kind in dict.fromkeys(table.kind[i] for i in table.order.tolist()):
        mask = torch.tensor([k == kind for k in table.kind])
        ax.hist(table.frequency[mask].numpy(), bins=bins, alpha=0.6, color=kind_color(kind), label=kind)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="firing frequency (held-out tokens)",
        ylabel="live latents",
        title=f"latent frequency ({table.kind.count('dead')} dead latents left out)",
    )
    ax.legend()
    return save(fig, path)


def latent_scaling(scalings: dict, path=None):
    """ν^r against ν^ε for each group of exclusive latents: near the origin is genuinely exclusive."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, scaling in scalings.items():
        ax.scatter(
            scaling.nu_error.numpy(),
            scaling.nu_reconstruction.numpy(),
            s=12,
            alpha=0.7,
            color=kind_color(label),
            label=label,
        )
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set(
        xlabel="ν^ε (other model's error holds it: Complete Shrinkage)",
        ylabel="ν^r (other model's reconstruction holds it: Latent Decoupling)",
        title="Latent Scaling",
    )
    ax.legend()
    return save(fig, path)


def relative_norms_by_truth(
    cc: CrossCoder, truth: GroundTruth, recovery: Recovery, exclusive_share: float = EXCLUSIVE_SHARE, path=None
):
    """The relative-norm histogram, each latent coloured by the kind of the true feature it matches."""
    relative = relative_decoder_norms(cc)[:, 1].numpy()
    matched = recovery.latent_feature
    true_kind = torch.where(matched >= 0, truth.kinds[matched.clamp(min=0)], -2)
    kinds = [(kind, kind_name(kind, 2)) for kind in (-1, 0, 1)]
    fig, ax = _stacked_relative_norms(
        [relative[(true_kind == kind).numpy()] for kind, _ in kinds] + [relative[(true_kind == -2).numpy()]],
        [f"true {name}" for _, name in kinds] + ["matches no true feature"],
        [kind_color(name) for _, name in kinds] + ["0.85"],
        exclusive_share,
        "latents",
        f"relative norms by true kind (false exclusives: {recovery.false_exclusive_rate:.1%})",
    )
    ax.legend(fontsize=8)
    return save(fig, path)


def method_comparison(scores: list, planted_kinds: dict[str, str], min_f1: float = 0.8, path=None):
    """Methods × planted behaviours (``methods.MethodScore`` rows with a best F1; each behaviour labelled with
    its planted kind): each cell the lowest best F1 of the method's top candidates over its training seeds
    (a method that does not train: its one), with the F1 range and the ranks; framed where found on every
    seed (F1 ≥ ``min_f1``)."""
    grouped = over_seeds(scores)
    methods = list(dict.fromkeys(method for method, _ in grouped))
    behaviours = list(planted_kinds)
    f1 = np.zeros((max(len(methods), 1), len(behaviours)))  # a behaviour without held-out tokens stays empty
    fig, ax = plt.subplots(figsize=(1.6 * len(behaviours) + 2, 0.55 * len(methods) + 1.5))
    for (method, behaviour), rows in grouped.items():
        i, j = methods.index(method), behaviours.index(behaviour)
        values, ranks = [r.best_f1 for r in rows], [r.rank for r in rows]
        f1[i, j] = min(values)
        text = f"{span(values)}\n#{span(ranks, '{}')}"
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if f1[i, j] > 0.6 else "black")
        if all(r.found for r in rows):
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, color="k"))
    image = ax.imshow(f1, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(behaviours)), [f"{b}\n({planted_kinds[b]})" for b in behaviours], rotation=30, ha="right")
    ax.set_yticks(range(len(methods)), methods)
    n_seeds = max(map(len, grouped.values()), default=1)
    ax.set_title(
        f"best F1 among each method's top candidates, over {n_seeds} training seeds where it trains "
        f"(colour: the lowest; framed: F1 ≥ {min_f1} on every seed; #rank)"
    )
    fig.colorbar(image, ax=ax, label="F1")
    fig.tight_layout()
    return save(fig, path)


def patching(patching: Patching, path=None):
    """Left: the share of the KL each patched latent closes where it fires, beside its two controls there.
    Right: the share the top-k sets close on all tokens against k, with random latents and random directions,
    and the ceilings (every latent, the error term alone)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    rows = patching.latents
    series = {
        "the latent": [p.closed.where for p in rows],
        "random directions, same norms": [p.random_directions.where for p in rows],
        "random live latents": [p.random_latents.where for p in rows],
    }
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        positions = np.arange(len(rows)) + (i - 1) * width
        left.bar(positions, values, width=width, label=name, color=["tab:red", "0.6", "0.8"][i])
    left.axhline(0, color="k", lw=0.5)
    left.set(
        xticks=range(len(rows)),
        xticklabels=[str(p.latents[0]) for p in rows],
        xlabel="latent, in ranking order",
        ylabel="share of the KL closed where it fires",
        title=f"each latent patched into the {patching.model}'s layers on the {patching.other}'s activation",
    )
    left.legend(fontsize=8, loc="best")
    k = [len(p.latents) for p in patching.sets]
    right.plot(k, [p.closed.everywhere for p in patching.sets], "o-", color="tab:red", label="top k")
    right.plot(k, [p.random_latents.everywhere for p in patching.sets], "o-", color="0.7", label="k random latents")
    right.plot(
        k, [p.random_directions.everywhere for p in patching.sets], "o--", color="0.5", label="random directions"
    )
    right.axhline(patching.all_latents, color="k", ls="--", label="every latent")
    right.axhline(patching.error_term, color="k", ls=":", label="the error term alone")
    right.set(xscale="log", xlabel="k", ylabel="share of the KL closed, all tokens", title="the top-k sets")
    right.set_xticks(k, [str(size) for size in k])
    right.minorticks_off()
    right.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the axes: clear of the lines
    fig.tight_layout()
    return save(fig, path)
