"""The encoder's gradient at a cost proportional to the active latents (the BatchTopK fast path).

Shapes: x [batch, n_models·d_model], W_enc [n_models·d_model, dict_size], b_enc [dict_size];
the code is given as ``rows``, ``latents`` (int64 [nnz]) and the pre-activations there, ``values`` [nnz].

Forward returns ``values`` (computed beforehand, densely and without autograd, because the selection
needs every score). Backward forms the gradient as a sparse [dict_size, batch] matrix in CSR form and
multiplies it with x, so the encoder's backward costs nnz·n_models·d_model instead of the dense
batch·dict_size·n_models·d_model (measured in bench/bench_train.py).
"""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, rows, latents, values):
        ctx.save_for_backward(x, W_enc, rows, latents, values)
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values):
        x, W_enc, rows, latents, values = ctx.saved_tensors
        grad = grad_values * (values > 0)  # the ReLU's derivative
        order = latents.argsort()
        crow = torch.searchsorted(latents[order], torch.arange(W_enc.shape[1] + 1, device=x.device))
        by_latent = torch.sparse_csr_tensor(
            crow, rows[order], grad[order], (W_enc.shape[1], len(x)), check_invariants=False
        )
        grad_W = (by_latent @ x).T if ctx.needs_input_grad[1] else None
        grad_b = values.new_zeros(W_enc.shape[1]).index_add_(0, latents, grad) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            by_row = torch.sparse_coo_tensor(torch.stack([rows, latents]), grad, (len(x), W_enc.shape[1]))
            grad_x = torch.sparse.mm(by_row, W_enc.T)
        return grad_x, grad_W, grad_b, None, None, None


def sparse_encode(x, W_enc, b_enc, rows, latents, values) -> torch.Tensor:
    """[nnz] pre-activations at (rows, latents), differentiable w.r.t. x, W_enc and b_enc."""
    return SparseEncode.apply(x, W_enc, b_enc, rows, latents, values)
