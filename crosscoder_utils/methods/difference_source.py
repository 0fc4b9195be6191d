"""Δx of a store served to training as a source of one model, computed as the store is read."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from ..normalize import factors_from_norms, save_norm_factors
from ..run import store_identity
from ..store import ActivationStore, StoreWriter

CHUNK = 65_536
"""Store rows read at a time: what bounds the memory of reading Δx."""


class DifferenceSource:
    """Δx = x_ft − x_base of a store's rows (normalised by the crosscoder's ``factors``), served to
    ``train_crosscoder`` as a source of one model, computed from the store as it is read and never written
    whole: a batch reads its rows of both models and subtracts (``batches``, ``sample``), so memory is a
    batch's, whatever the store. The held-out rows 04's statistics read (the first ``max_heldout`` of the
    store's val split) are written beside the run, as a run trained from the models writes its own."""

    n_models = 1

    def __init__(self, store: ActivationStore, factors: torch.Tensor, max_heldout: int):
        self.store, self.factors, self.max_heldout = store, factors, max_heldout
        self.d_model = store.d_model
        self.meta = {**store.meta, "n_models": 1, "models": ["finetuned - base"]}

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.factors[None, :, None]
        return (x[:, 1] - x[:, 0])[:, None]

    def split_range(self, split: str) -> range:
        return self.store.split_range(split)

    def n_batches(self, tokens_per_batch: int) -> int:
        return self.store.n_batches(tokens_per_batch)

    def batches(self, tokens_per_batch: int, seed: int = 0, start_batch: int = 0, process=(0, 1)):
        """One pass of float32 [tokens_per_batch / world, 1, d_model] batches: the store's, differenced."""
        for x in self.store.batches(tokens_per_batch, seed=seed, start_batch=start_batch, process=process):
            yield self._delta(x)

    def sample(self, n_rows: int, seed: int = 0) -> torch.Tensor:
        return self._delta(self.store.sample(n_rows, seed))

    def norm_factors(self) -> torch.Tensor:
        """The factor that scales Δx's mean norm to sqrt(d_model), on a sample of 32,768 training rows."""
        mean_norm = self.sample(32_768).norm(dim=-1).mean(0)
        return factors_from_norms(mean_norm, self.d_model, f"the norm factor of Δx of {self.store.path}")

    def identity(self) -> dict:
        """What a run trained on it records: the store, the factors and the held-out rows it differences."""
        return {
            "difference_of": store_identity(self.store),
            "factors": self.factors.tolist(),
            "heldout": self.max_heldout,
        }

    def write_heldout(self, path: str | Path, factors: torch.Tensor) -> ActivationStore:
        """Δx of the first ``max_heldout`` val rows as a store whose every row is ``val``, with the store's token
        ids and positions, written ``CHUNK`` rows a shard; ``factors`` is its norm.json. One already complete at
        ``path`` is read back."""
        path = Path(path)
        if (path / "meta.json").exists():
            return ActivationStore(path)
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        val = self.split_range("val")
        rows = np.arange(val.start, min(val.stop, val.start + self.max_heldout))
        writer = StoreWriter(partial, self.identity(), 1, self.d_model, "float32")
        for number, start in enumerate(range(0, len(rows), CHUNK)):
            part = rows[start : start + CHUNK]
            seq, pos = self.store.positions(part)
            stats = writer.write_shard(self._delta(self.store.read(part)), self.store.token_ids(part), seq, pos, number)
            writer.record(stats, n_blocks=number + 1)
        writer.finish(**{**self.meta, "val_fraction": 1.0})
        partial.rename(path)
        store = ActivationStore(path)
        save_norm_factors(store, factors, n_batches=0)
        return store
