"""Training-step throughput of each variant against a plain dense implementation, side by side.

The plain implementation is what a crosscoder looks like without this project's fast path: a dense
encoder forward and backward, a top-k over the flattened batch·dict_size scores, a dense decode.
Ours (CrossCoder.losses in training mode) selects on no-grad pre-activations, then encodes and decodes
only the kept latents (sparse_encode, embedding_bag). Target for batchtopk at dict_size 16384, k 100: >= 3x.

Run: .venv/bin/python bench/bench_train.py [--batch 2048 --d-model 512 --dict-size 16384 --k 100 --steps 3]
"""

import argparse
import time

import torch
from einops import einsum

from crosscoder_utils import CrossCoder, CrossCoderConfig


def plain_step(cc: CrossCoder, x: torch.Tensor, l1_coeff: float = 2.0) -> torch.Tensor:
    """The textbook dense step: every latent encoded, selected by mask, and decoded."""
    pre = torch.relu(einsum(x, cc.W_enc, "b m d, m d l -> b l") + cc.b_enc)
    norms = cc.W_dec.norm(dim=-1).sum(-1)
    if cc.cfg.variant == "batchtopk":
        scores = (pre * norms).flatten()
        mask = torch.zeros_like(scores).index_fill_(0, scores.topk(cc.cfg.k * len(x)).indices, 1.0)
        f = pre * mask.view_as(pre)
    else:
        f = pre
    x_hat = einsum(f, cc.W_dec, "b l, l m d -> b m d") + cc.b_dec
    loss = (x - x_hat).pow(2).sum((1, 2)).mean()
    return loss + l1_coeff * (f * norms).sum(-1).mean() if cc.cfg.variant == "relu" else loss


def time_steps(step, cc, x, steps) -> float:
    optimizer = torch.optim.Adam(cc.parameters(), lr=1e-4)
    for i in range(steps + 1):  # the first step warms up and is not counted
        if i == 1:
            start = time.perf_counter()
        step(cc, x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--dict-size", type=int, default=16384)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 2, args.d_model, device=args.device)
    print(
        f"batch {args.batch}, n_models 2, d_model {args.d_model}, dict_size {args.dict_size}, k {args.k}, "
        f"device {args.device}, {torch.get_num_threads()} threads"
    )
    for variant in ("relu", "batchtopk"):
        cfg = CrossCoderConfig(
            d_model=args.d_model, n_models=2, dict_size=args.dict_size, variant=variant, k=args.k, aux_coeff=0.0
        )
        cc = CrossCoder(cfg).to(args.device).train()
        plain = time_steps(plain_step, cc, x, args.steps)
        ours = time_steps(lambda model, batch: model.losses(batch).loss, cc, x, args.steps)
        print(
            f"{variant:>9}: plain dense {args.batch / plain:9,.0f} tok/s ({plain:.3f} s/step)   "
            f"ours {args.batch / ours:9,.0f} tok/s ({ours:.3f} s/step)   speed-up {plain / ours:.2f}x"
        )


if __name__ == "__main__":
    main()
