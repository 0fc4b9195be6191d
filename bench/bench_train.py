"""Training-step throughput of each variant against the dense steps users would otherwise run, side by side.

* plain: the textbook dense step: every latent encoded with autograd, selected by mask, decoded densely.
* public: BatchTopK written the way the public trainers are (dictionary_learning's BatchTopK SAE and the
  sparsity-artifacts BatchTopK crosscoder): the encoder with autograd, a top-k over the flattened
  decoder-norm-weighted scores, the kept values scattered into a dense code, a dense decode, AuxK over
  dead latents.
* ours: CrossCoder.losses in training mode: for batchtopk the selection on no-grad pre-activations, then
  only the kept latents encoded (sparse_encode) and decoded (embedding_bag).

Every step uses fused Adam (what train_crosscoder uses); ours is also timed with the for-loop Adam, the
lever's measure. Each step's share of the dense-FLOP ceiling: 10·B·n·d·F FLOPs (the dense step's encoder
forward and weight gradient, and decoder forward and both gradients) per step time, over a float32 matmul
of the encoder's shape measured in the same run (bf16 on CUDA, where every step runs under bf16 autocast as
train_crosscoder's do). Peak RSS: each step alone in a fresh process; on CUDA, peak GPU memory.
Target for batchtopk at dict_size 16384, k 100: ours >= 3x the public step; relu at parity with plain.

Run: .venv/bin/python bench/bench_train.py [--batch 2048 --d-model 512 --dict-size 16384 --k 100 --steps 3]
[--profile] (--profile: the ten ops with the most self time in each batchtopk step, from torch.profiler)
"""

import argparse
import subprocess
import sys
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


def public_step(cc: CrossCoder, x: torch.Tensor) -> torch.Tensor:
    """BatchTopK as the public trainers write it: dense encoder with autograd, flat top-k, dense decode, AuxK."""
    pre = torch.relu(einsum(x, cc.W_enc, "b m d, m d l -> b l") + cc.b_enc)
    scores = (pre * cc.W_dec.norm(dim=-1).sum(-1)).flatten()
    kept = scores.topk(cc.cfg.k * len(x)).indices
    f = torch.zeros_like(scores).scatter(0, kept, pre.flatten()[kept]).view_as(pre)
    x_hat = einsum(f, cc.W_dec, "b l, l m d -> b m d") + cc.b_dec
    residual = x - x_hat
    loss = residual.pow(2).sum((1, 2)).mean()
    dead = cc.dead_latents()
    if dead.any():  # AuxK: the dead latents' top pre-activations reconstruct the residual
        k_aux = min(cc.cfg.k_aux, int(dead.sum()))
        aux = pre * dead
        values, latents = aux.topk(k_aux, dim=1)
        aux_hat = einsum(torch.zeros_like(aux).scatter(1, latents, values), cc.W_dec, "b l, l m d -> b m d")
        loss = loss + cc.cfg.aux_coeff * (residual.detach() - aux_hat).pow(2).sum((1, 2)).mean()
    return loss


def dense_path_step(cc: CrossCoder, x: torch.Tensor) -> torch.Tensor:
    """Ours with the sparse path off (TrainConfig.sparse_path="off"): what ``auto`` weighs it against."""
    cc.sparse_path = False
    return cc.losses(x).loss


STEPS = {
    "plain": plain_step,
    "public": public_step,
    "ours": lambda model, batch: model.losses(batch).loss,
    "ours, dense path": dense_path_step,
}


def time_steps(step, cc, x, steps, fused=True) -> float:
    optimizer = torch.optim.Adam(cc.parameters(), lr=1e-4, fused=fused, foreach=None if fused else False)
    for i in range(steps + 1):  # the first step warms up and is not counted
        if i == 1:
            start = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):  # as train_crosscoder does on CUDA
            loss = step(cc, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def profile(step, cc, x, name: str) -> None:
    """Print the ten ops with the most self time (CUDA time on a GPU) over three steps after a warm-up."""
    time_steps(step, cc, x, 1)
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * x.is_cuda
    with torch.profiler.profile(activities=activities) as prof:
        time_steps(step, cc, x, 2)
    sort_by = "self_cuda_time_total" if x.is_cuda else "self_cpu_time_total"
    print(f"--- {name}\n{prof.key_averages().table(sort_by=sort_by, row_limit=10)}", flush=True)


def matmul_rate(a: torch.Tensor, b: torch.Tensor, repeats: int = 5) -> float:
    """FLOP/s of a @ b (after a warm-up)."""
    a @ b
    if a.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if a.is_cuda:
        torch.cuda.synchronize()
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * repeats / (time.perf_counter() - start)


def model(args, variant: str) -> CrossCoder:
    torch.manual_seed(0)
    cfg = CrossCoderConfig(d_model=args.d_model, n_models=2, dict_size=args.dict_size, variant=variant, k=args.k)
    return CrossCoder(cfg).to(args.device).train()


def batch(args) -> torch.Tensor:
    return torch.randn(args.batch, 2, args.d_model, generator=torch.Generator().manual_seed(0)).to(args.device)


def peak_rss(args, variant: str, step: str) -> float:
    """GiB: the peak resident memory of a fresh process that runs one step (and a warm-up)."""
    command = [sys.executable, __file__, "--only", variant, step] + [
        f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items() if name not in ("only", "profile")
    ]
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--dict-size", type=int, default=16384)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="print each batchtopk step's costliest ops")
    parser.add_argument("--only", nargs=2, help=argparse.SUPPRESS)  # variant and step: peak RSS of one step
    args = parser.parse_args()
    if args.only:
        time_steps(STEPS[args.only[1]], model(args, args.only[0]), batch(args), 1)
        # VmHWM: this process's peak (getrusage's ru_maxrss would include the parent's, inherited at fork)
        peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
        print(int(peak.split()[1]) / 2**20)
        return
    x = batch(args)
    print(
        f"batch {args.batch}, n_models 2, d_model {args.d_model}, dict_size {args.dict_size}, k {args.k}, "
        f"device {args.device}, {torch.get_num_threads()} threads"
    )
    dtype = torch.bfloat16 if x.is_cuda else torch.float32  # on CUDA the steps run under bf16 autocast
    weights = torch.randn(2 * args.d_model, args.dict_size, device=args.device, dtype=dtype)
    ceiling = matmul_rate(x.flatten(1).to(dtype), weights)
    if args.profile:
        for name in ("public", "ours", "ours, dense path"):
            profile(STEPS[name], model(args, "batchtopk"), x, name)
    print(f"dense {dtype} matmul of the encoder's shape: {ceiling / 1e9:,.0f} GFLOP/s")
    dense_flops = 10 * args.batch * 2 * args.d_model * args.dict_size
    for variant, names in (("relu", ("plain", "ours")), ("batchtopk", ("plain", "public", "ours", "ours, dense path"))):
        times = {name: time_steps(STEPS[name], model(args, variant), x, args.steps) for name in names}
        times["ours, for-loop Adam"] = time_steps(STEPS["ours"], model(args, variant), x, args.steps, fused=False)
        baseline = times["public" if variant == "batchtopk" else "plain"]
        for name, seconds in times.items():
            if "Adam" in name:
                memory = ""
            elif x.is_cuda:
                torch.cuda.reset_peak_memory_stats()
                time_steps(STEPS[name], model(args, variant), x, 1)
                memory = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            else:
                memory = f", peak RSS {peak_rss(args, variant, name):.2f} GiB"
            print(
                f"{variant:>9} {name:<20} {args.batch / seconds:8,.0f} tok/s ({seconds:.3f} s/step), "
                f"{baseline / seconds:.2f}x the {'public' if variant == 'batchtopk' else 'plain'} step, "
                f"{dense_flops / seconds / ceiling:.0%} of the dense-FLOP ceiling{memory}",
                flush=True,
            )


if __name__ == "__main__":
    main()
