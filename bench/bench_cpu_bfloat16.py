"""The gemma3-270m recipe's models in float32 and in bfloat16 on this CPU, side by side: what each notebook's
forwards and the fine-tune cost, and what bfloat16 changes in the numbers they give.

1. 01's pass (``TracedPair.activations``: both models to layer 9) and 04's (``TracedPair.logits``: a full
   forward with the 262k-vocabulary logits), s a token, on corpus documents of 128 tokens, 4 a batch.
2. What bfloat16 changes: the site activations (relative error of x and of Δx = x_ft − x_base against float32)
   and the per-token KL(ft ‖ base) (its mean in each dtype, the correlation of the two over tokens), beside
   the noise floor (KL between one model's float32 and bfloat16 distributions).
3. A step of build_pair.py's fine-tune (2 Bible rows, 1 generic row) in float32 and under bfloat16 autocast.

Run after the pair is built (``make recipe RECIPE=gemma3-270m`` or its build_pair.py):
    python bench/bench_cpu_bfloat16.py --pair outputs/gemma3-270m
"""

import argparse
import copy
import importlib.util
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import torch
import torch.nn.functional as F

from crosscoder_utils.collect import TracedPair
from crosscoder_utils.models import load_model_pair

RECIPE = Path(__file__).parents[1] / "recipes/gemma3-270m"


def timed(function, repeats: int):
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = function()
    return (time.perf_counter() - start) / repeats, out


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pair", default="outputs/gemma3-270m")
    p.add_argument("--batches", type=int, default=4, help="batches of 4 documents measured")
    p.add_argument("--steps", type=int, default=3, help="fine-tuning steps timed in each dtype")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    pair_dir = Path(args.pair)
    pairs = {
        dtype: load_model_pair(pair_dir / "base", pair_dir / "finetuned", dtype, "cpu")
        for dtype in ("float32", "bfloat16")
    }
    tokenizer = pairs["float32"].tokenizer
    texts = datasets.load_from_disk(str(pair_dir / "corpus"))["text"][: 4 * args.batches]
    sequences = tokenizer(texts, max_length=128, truncation=True)["input_ids"]
    traced = {dtype: TracedPair(pair, "resid_post", 9) for dtype, pair in pairs.items()}
    batches = [traced["float32"].pad(sequences[i : i + 4]) for i in range(0, len(sequences), 4)]
    keep = torch.cat([mask.flatten() for _, mask, _ in batches]).bool()
    n_tokens = int(keep.sum())

    seconds, site, logps = {}, {}, {}
    for dtype, t in traced.items():
        seconds[dtype, "site"], site[dtype] = timed(lambda t=t: [t.activations(*b).float() for b in batches], 1)
        seconds[dtype, "logits"], logps[dtype] = timed(
            lambda t=t: [[F.log_softmax(t.logits(m, *b).float(), -1) for m in (0, 1)] for b in batches], 1
        )
    print(f"{n_tokens} tokens, {len(batches)} batches of 4 documents of 128 tokens")
    for what, notebook in (("site", "01: both models to layer 9"), ("logits", "04: both models, full, logits")):
        a, b = seconds["float32", what], seconds["bfloat16", what]
        print(f"{notebook}: float32 {n_tokens / a:.0f} tokens/s, bfloat16 {n_tokens / b:.0f} tokens/s ({a / b:.1f}x)")

    x32, x16 = (torch.cat([x.flatten(0, 1) for x in site[d]])[keep] for d in ("float32", "bfloat16"))
    relative = lambda a, b: float((a - b).norm() / b.norm())
    print(f"site activations: relative error of x {relative(x16, x32):.4f}, ", end="")
    print(f"of Δx {relative(x16[:, 1] - x16[:, 0], x32[:, 1] - x32[:, 0]):.4f}")
    per_token = {d: torch.cat([kl(lp[1], lp[0]).flatten() for lp in logps[d]])[keep] for d in logps}
    floor = torch.cat([kl(a[1], b[1]).flatten() for a, b in zip(logps["float32"], logps["bfloat16"])])[keep]
    correlation = float(torch.corrcoef(torch.stack([per_token["float32"], per_token["bfloat16"]]))[0, 1])
    print(
        f"KL(ft || base) a token: float32 {per_token['float32'].mean():.4f}, bfloat16 "
        f"{per_token['bfloat16'].mean():.4f} nats, correlation over tokens {correlation:.3f}; "
        f"KL(fine-tune float32 || fine-tune bfloat16) {floor.mean():.4f}"
    )

    spec = importlib.util.spec_from_file_location("build_pair", RECIPE / "build_pair.py")
    build_pair = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_pair)
    base = pairs["float32"].base
    rows = build_pair.pack(texts, tokenizer, 128)
    for autocast in ("float32", "bfloat16"):
        settings = SimpleNamespace(seed=0, lr=3e-5, batch=2, kl_batch=1, kl_to_base=1.0, autocast=autocast)
        model = copy.deepcopy(base).requires_grad_(True)
        build_pair.finetune(model, base, rows, rows, SimpleNamespace(**vars(settings), steps=1))  # warm-up
        start = time.perf_counter()
        build_pair.finetune(model, base, rows, rows, SimpleNamespace(**vars(settings), steps=args.steps))
        seconds[autocast, "step"] = (time.perf_counter() - start) / args.steps
    a, b = seconds["float32", "step"], seconds["bfloat16", "step"]
    print(f"a fine-tuning step: float32 {a:.2f} s, bfloat16 autocast {b:.2f} s ({a / b:.1f}x)")


if __name__ == "__main__":
    main()
