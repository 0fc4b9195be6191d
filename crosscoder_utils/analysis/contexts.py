"""Where latents fire, as text: a store row's context, and each latent's top and sampled activations."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..store import ActivationStore
from .encoding import Encoded


def context(store: ActivationStore, tokenizer, row: int, width: int = 8) -> str:
    """The token at a store row in its sequence, ``width`` stored tokens either side, as text: a «b» c."""
    window = np.arange(max(0, row - width), min(len(store), row + width + 1))
    seq, _ = store.positions(window)
    window = window[(seq == seq[window == row]).numpy()]
    tokens = store.token_ids(window).tolist()
    return "".join(f"«{tokenizer.decode([t])}»" if r == row else tokenizer.decode([t]) for r, t in zip(window, tokens))


class LatentSamples(NamedTuple):
    """Each latent's top activations and a uniform sample of its other activations, from one pass."""

    top_values: torch.Tensor
    """[dict_size, n_top] largest activations, descending (0 where it fired fewer times)."""
    top_rows: torch.Tensor
    """[dict_size, n_top] their store rows (-1 where none)."""
    sample_values: torch.Tensor
    """[dict_size, n_sample] activations drawn uniformly from all its firings, ascending (0 where none)."""
    sample_rows: torch.Tensor
    """[dict_size, n_sample] their store rows (-1 where none)."""


def _first_per_latent(latents: torch.Tensor, key: torch.Tensor, n: int, n_latents: int):
    """(indices, positions): the first ``n`` entries of each latent by ascending ``key``, grouped by latent,
    and each one's position in its group."""
    order = key.argsort(stable=True)
    order = order[latents[order].argsort(stable=True)]
    counts = torch.bincount(latents, minlength=n_latents)
    position = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts)[latents[order]]
    keep = position < n
    return order[keep], position[keep]


def latent_samples(encoded: Encoded, n_top: int = 10, n_sample: int = 30, seed: int = 0) -> LatentSamples:
    """Each latent's ``n_top`` largest activations and ``n_sample`` firings drawn uniformly (random
    priorities, the smallest kept), with their store rows."""
    latents, values = encoded.latent, encoded.value
    rows = torch.from_numpy(encoded.rows)[encoded.token]
    priority = torch.rand(len(latents), generator=torch.Generator().manual_seed(seed))
    n_latents = encoded.dict_size

    def table(key: torch.Tensor, width: int, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n_latents, width] values and rows of the entries chosen by ``key``, each latent's laid out by ``order``."""
        chosen, _ = _first_per_latent(latents, key, width, n_latents)
        index, position = _first_per_latent(latents[chosen], order[chosen], width, n_latents)
        index = chosen[index]
        out_values, out_rows = torch.zeros(n_latents, width), torch.full((n_latents, width), -1)
        out_values[latents[index], position] = values[index]
        out_rows[latents[index], position] = rows[index]
        return out_values, out_rows

    return LatentSamples(*table(-values, n_top, -values), *table(priority, n_sample, values))
