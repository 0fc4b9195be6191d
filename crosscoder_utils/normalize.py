"""Norm scale factors: one scalar per model so that the mean activation norm becomes sqrt(d_model)."""

from __future__ import annotations

import math

import torch

from .config import check_range
from .notebook import progress
from .store import ActivationStore


def estimate_norm_factors(
    store: ActivationStore, n_batches: int = 100, tokens_per_batch: int = 4096, seed: int = 0
) -> torch.Tensor:
    """float32 [n_models]: factors that scale each model's mean activation norm to sqrt(d_model).

    Averaged over ``n_batches`` shuffled training batches. Excluded tokens (BOS, chat tokens ...) were
    never stored, so they never count. The factors are written to ``<store>/norm.json``.
    """
    if not isinstance(store, ActivationStore):
        raise TypeError(f"store must be an ActivationStore (ActivationStore(path) opens one), got {store!r}")
    check_range("n_batches", n_batches, above=0, integer=True)
    check_range("tokens_per_batch", tokens_per_batch, above=0, integer=True)
    norms = []
    batches = store.batch_rows(min(tokens_per_batch, len(store.split_range("train"))), seed=seed)
    for rows, _ in zip(batches, progress(range(n_batches), desc="norm factors")):
        norms.append(store.read(rows).double().norm(dim=-1).mean(0))  # float64: a float32 norm overflows past 1e19
        if not torch.isfinite(norms[-1]).all():  # estimating again would read the same rows: name the first
            row = store.first_nonfinite(rows)
            raise ValueError(
                f"the store holds a value that is not finite (NaN or inf) at {store.locate(row)}: no norm factors "
                "can be estimated from it. The writer refuses such values, so the shard changed after it was "
                "written: ActivationStore(path, verify=True) names the shards that no longer match their "
                "checksums; collect the store again"
            )
    factors = factors_from_norms(
        torch.stack(norms).mean(0).float(), store.d_model, f"the norm factors estimated from {store.path}"
    )
    save_norm_factors(store, factors, len(norms))
    return factors


def factors_from_norms(mean_norm: torch.Tensor, d_model: int, where: str) -> torch.Tensor:
    """float32 [n_models]: sqrt(d_model) / each model's mean activation norm, refused unless finite and positive."""
    factors = math.sqrt(d_model) / mean_norm
    check_factors(factors, len(mean_norm), where)
    return factors


def save_norm_factors(store: ActivationStore, factors: torch.Tensor, n_batches: int) -> None:
    """Write ``<store>/norm.json``: the factors and the number of batches they were estimated from."""
    store.write_json(
        "norm.json", {"norm_factors": factors.tolist(), "n_batches": n_batches, "models": store.meta["models"]}
    )


def load_norm_factors(store: ActivationStore) -> torch.Tensor:
    """float32 [n_models]: the factors ``estimate_norm_factors`` wrote into the store."""
    norm = store.read_json("norm.json")
    if norm is None:
        raise FileNotFoundError(
            f"{store.path} has no norm.json: run 02_normalize (estimate_norm_factors) on this store first"
        )
    where = f"{store.path}/norm.json"
    try:
        factors = torch.tensor(norm["norm_factors"], dtype=torch.float32)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{where} holds no list of numbers under 'norm_factors' ({error!r}): estimate them again"
        ) from error
    check_factors(factors, store.n_models, where)
    scaled = factors * torch.tensor(store.meta["mean_norm"]) / math.sqrt(store.d_model)
    if not ((scaled > 0.5) & (scaled < 2)).all():  # estimated factors scale the mean norm to about sqrt(d_model)
        raise ValueError(
            f"{where} scales the store's mean activation norms to {scaled.tolist()} × sqrt(d_model), not about 1: "
            "they are not this store's factors; estimate them again (02_normalize)"
        )
    return factors


def check_factors(factors: torch.Tensor, n_models: int, where: str) -> None:
    """Refuse factors that are not one finite, positive number per model."""
    if factors.shape != (n_models,) or not (torch.isfinite(factors) & (factors > 0)).all():
        raise ValueError(
            f"{where} must hold one finite, positive factor per model ({n_models}), got {factors.tolist()}: "
            "estimate them again (02_normalize); an all-zero or non-finite model activation gives no factor"
        )


def activation_norms(store: ActivationStore, n_rows: int = 20_000, seed: int = 0) -> torch.Tensor:
    """[n, n_models]: the raw activation norm of each model on up to ``n_rows`` random training tokens."""
    return store.sample(n_rows, seed).norm(dim=-1)
