"""One pass of a crosscoder over a store's split (``encode``): every firing, kept sparse, with the sums that
the reports' statistics need, so that each report reads the split once."""

from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np
import torch

from ..config import model_roles
from ..crosscoder import CrossCoder
from ..models import resolve_device
from ..notebook import progress
from ..store import ActivationStore


class Encoded(NamedTuple):
    """The crosscoder's latents on a split, from one pass (``encode``): every firing, kept sparse, and the sums
    that the statistics need besides the firings, so that every statistic of a report reads the split once."""

    rows: np.ndarray
    """int64 [n] the store rows read, ascending."""
    token: torch.Tensor
    """int64 [nnz] each firing's index into ``rows``, ascending."""
    latent: torch.Tensor
    """int64 [nnz] each firing's latent."""
    value: torch.Tensor
    """[nnz] each firing's activation."""
    dict_size: int
    explained_variance_per_model: torch.Tensor
    """[n_models] on the rows read."""
    squared_difference: torch.Tensor
    """[n, n_models] ‖x_m − x_base‖² per token."""
    f_squared: torch.Tensor
    """float64 [dict_size] Σ_t f_j(t)²."""
    f_x: torch.Tensor
    """float64 [dict_size, n_models, d_model] Σ_t f_j(t) x_m(t): with ``f_x_hat``, Latent Scaling of any latent."""
    f_x_hat: torch.Tensor
    """float64 [dict_size, n_models, d_model] Σ_t f_j(t) x̂_m(t)."""

    @property
    def n_tokens(self) -> int:
        return len(self.rows)

    @property
    def frequency(self) -> torch.Tensor:
        """[dict_size] fraction of the tokens on which each latent fires."""
        return torch.bincount(self.latent, minlength=self.dict_size).float() / self.n_tokens

    @property
    def l0(self) -> float:
        """Mean active latents per token."""
        return len(self.latent) / self.n_tokens

    def explained_variance_by_model(self) -> dict[str, float]:
        """Each model's explained variance on the rows read, by role (base, finetuned, ...)."""
        values = self.explained_variance_per_model.tolist()
        return dict(zip(model_roles(len(values)), values))

    def activations(self, latents, positions=None) -> torch.Tensor:
        """[len(positions), L] the activations of ``latents`` at ``positions`` (indices into ``rows``,
        ascending; all of them by default), dense."""
        latents = torch.as_tensor(latents, dtype=torch.long)
        positions = torch.arange(self.n_tokens) if positions is None else torch.as_tensor(positions, dtype=torch.long)
        column = torch.full((self.dict_size,), -1)
        column[latents] = torch.arange(len(latents))
        lo = int(torch.searchsorted(self.token, positions[0]))
        hi = int(torch.searchsorted(self.token, positions[-1], right=True))
        token, latent, value = self.token[lo:hi], self.latent[lo:hi], self.value[lo:hi]
        index = torch.searchsorted(positions, token).clamp(max=len(positions) - 1)
        keep = (positions[index] == token) & (column[latent] >= 0)
        out = torch.zeros(len(positions), len(latents))
        out[index[keep], column[latent[keep]]] = value[keep]
        return out


@torch.no_grad()
def encode(
    cc: CrossCoder,
    store: ActivationStore,
    factors: torch.Tensor,
    split: str = "val",
    tokens_per_batch: int = 4096,
    max_tokens: int | None = None,
    device: str = "cpu",
) -> Encoded:
    """One pass of ``cc`` (in eval mode, a copy on ``device``; bf16 autocast on CUDA) over a split's first
    ``max_tokens`` tokens (all by default), in store order, normalised by ``factors``."""
    span = store.split_range(split)
    stop = span.stop if max_tokens is None else min(span.stop, span.start + max_tokens)
    if stop <= span.start:
        raise ValueError(f"the store's {split!r} split is empty; collect a store with val_fraction > 0")
    device = torch.device(resolve_device(device))
    crosscoder = copy.deepcopy(cc).to(device).eval()
    factors = factors.to(device)[None, :, None]
    shape = (cc.cfg.dict_size, cc.cfg.n_models * cc.cfg.d_model)
    f_x, f_x_hat = (torch.zeros(shape, dtype=torch.float64, device=device) for _ in range(2))
    f_squared = torch.zeros(cc.cfg.dict_size, dtype=torch.float64, device=device)
    moments = torch.zeros(4, cc.cfg.n_models, cc.cfg.d_model, dtype=torch.float64, device=device)
    tokens, latents, values, squared = [], [], [], []
    for start in progress(range(span.start, stop, tokens_per_batch), desc=f"encoding {split}"):
        x = store.read(np.arange(start, min(start + tokens_per_batch, stop))).to(device) * factors
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            f = crosscoder.encode(x)
            x_hat = crosscoder.decode(f)
        f, x_hat = f.float(), x_hat.float()
        token, latent = (f > 0).nonzero(as_tuple=True)
        value = f[token, latent]
        tokens.append((token + start - span.start).cpu())
        latents.append(latent.cpu())
        values.append(value.cpu())
        # f.T as a sparse matrix: the sums cost its firings, not batch × dict_size (a dense f.T @ x took most
        # of the pass at dict 2,000)
        f_t = torch.sparse_coo_tensor(torch.stack([latent, token]), value, (len(f.T), len(f)), check_invariants=False)
        f_x += torch.sparse.mm(f_t, x.flatten(1)).double()
        f_x_hat += torch.sparse.mm(f_t, x_hat.flatten(1)).double()
        f_squared += f.pow(2).sum(0).double()
        error = (x - x_hat).double()
        moments += torch.stack([error.sum(0), error.pow(2).sum(0), x.double().sum(0), x.double().pow(2).sum(0)])
        squared.append((x - x[:, :1]).pow(2).sum(-1).cpu())
    mean = (moments / (stop - span.start)).cpu()
    variance = (mean[[1, 3]] - mean[[0, 2]] ** 2).sum(-1)  # of the error and of x, per model
    return Encoded(
        np.arange(span.start, stop),
        torch.cat(tokens),
        torch.cat(latents),
        torch.cat(values),
        cc.cfg.dict_size,
        (1 - variance[0] / variance[1]).float(),
        torch.cat(squared),
        f_squared.cpu(),
        *(sums.view(cc.cfg.dict_size, cc.cfg.n_models, cc.cfg.d_model).cpu() for sums in (f_x, f_x_hat)),
    )
