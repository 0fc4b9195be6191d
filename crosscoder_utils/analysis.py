"""Reading a trained crosscoder: decoder-norm statistics and what they say about the model diff."""
from __future__ import annotations

import torch

from .crosscoder import CrossCoder


@torch.no_grad()
def relative_decoder_norms(cc: CrossCoder) -> torch.Tensor:
    """[dict_size, n_models]: each model's share ‖d_m‖ / Σ_m' ‖d_m'‖ of a latent's decoder norm,
    in normalised units. For two models column 1 is the usual ‖d_ft‖ / (‖d_base‖ + ‖d_ft‖)."""
    norms = cc.decoder_norms()
    return norms / norms.sum(-1, keepdim=True).clamp(min=1e-12)
