"""Norm scale factors: one scalar per model so that the mean activation norm becomes sqrt(d_model)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

from .store import ActivationStore


def sample_rows(store: ActivationStore, n_rows: int, seed: int = 0, split: str = "train") -> torch.Tensor:
    """float32 [n, n_models, d_model]: up to ``n_rows`` random rows of a split, from the first shuffled
    windows of shards (so a streamed store downloads only those shards)."""
    indices, have = [], 0
    for window in store.shuffled_indices(split, seed):
        if have >= n_rows:
            break
        indices.append(window)
        have += len(window)
    return store.read(np.sort(np.concatenate(indices)[:n_rows]))


def estimate_norm_factors(store: ActivationStore, n_batches: int = 100, batch_size: int = 4096, seed: int = 0) -> torch.Tensor:
    """float32 [n_models]: factors that scale each model's mean activation norm to sqrt(d_model).

    Averaged over ``n_batches`` shuffled training batches. Excluded tokens (BOS, chat tokens ...) were
    never stored, so they never count. The factors are written to ``<store>/norm.json``.
    """
    norms = []
    batches = store.batches(min(batch_size, len(store.split_range("train"))), seed=seed)
    for batch, _ in zip(batches, tqdm(range(n_batches), desc="norm factors")):
        norms.append(batch.norm(dim=-1).mean(0))
    mean_norm = torch.stack(norms).mean(0)
    factors = math.sqrt(store.d_model) / mean_norm
    store.write_json("norm.json", {"norm_factors": factors.tolist(), "n_batches": len(norms), "models": store.meta["models"]})
    return factors


def load_norm_factors(store: ActivationStore) -> torch.Tensor:
    norm = store.read_json("norm.json")
    if norm is None:
        raise FileNotFoundError(f"{store.path} has no norm.json: run 02_normalize (estimate_norm_factors) on this store first")
    return torch.tensor(norm["norm_factors"])


def plot_norm_histograms(store: ActivationStore, factors: torch.Tensor | None = None, n_rows: int = 20_000, path=None):
    """Histogram of each model's activation norms (raw, and scaled by ``factors`` when given)."""
    norms = sample_rows(store, n_rows).norm(dim=-1)
    panels = [("raw", norms)] + ([("normalised", norms * factors)] if factors is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        for m, name in enumerate(store.meta["models"]):
            ax.hist(values[:, m].numpy(), bins=80, alpha=0.6, label=f"model {m}: {Path(str(name)).name}")
        if title == "normalised":
            ax.axvline(math.sqrt(store.d_model), color="k", ls="--", label="sqrt(d_model)")
        ax.set(title=f"{title} activation norms", xlabel="L2 norm", ylabel="tokens")
        ax.legend()
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig
