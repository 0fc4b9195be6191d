"""Norm scale factors: one scalar per model so that the mean activation norm becomes sqrt(d_model)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .store import ActivationStore


def estimate_norm_factors(
    store: ActivationStore, n_batches: int = 100, tokens_per_batch: int = 4096, seed: int = 0
) -> torch.Tensor:
    """float32 [n_models]: factors that scale each model's mean activation norm to sqrt(d_model).

    Averaged over ``n_batches`` shuffled training batches. Excluded tokens (BOS, chat tokens ...) were
    never stored, so they never count. The factors are written to ``<store>/norm.json``.
    """
    norms = []
    batches = store.batches(min(tokens_per_batch, len(store.split_range("train"))), seed=seed)
    for batch, _ in zip(batches, tqdm(range(n_batches), desc="norm factors")):
        norms.append(batch.norm(dim=-1).mean(0))
    mean_norm = torch.stack(norms).mean(0)
    factors = math.sqrt(store.d_model) / mean_norm
    norm = {"norm_factors": factors.tolist(), "n_batches": len(norms), "models": store.meta["models"]}
    store.write_json("norm.json", norm)
    return factors


def load_norm_factors(store: ActivationStore) -> torch.Tensor:
    """float32 [n_models]: the factors ``estimate_norm_factors`` wrote into the store."""
    norm = store.read_json("norm.json")
    if norm is None:
        raise FileNotFoundError(
            f"{store.path} has no norm.json: run 02_normalize (estimate_norm_factors) on this store first"
        )
    return torch.tensor(norm["norm_factors"])


def activation_norms(store: ActivationStore, n_rows: int = 20_000, seed: int = 0) -> torch.Tensor:
    """[n, n_models]: the raw activation norm of each model on up to ``n_rows`` random training tokens."""
    return store.sample(n_rows, seed).norm(dim=-1)
