"""Training quality on the hard synthetic ground truth: recovered / classified right per kind, false
exclusives and tokens/s for several training recipes and crosscoder variants, side by side on the same data.

Hard default setting (SyntheticConfig defaults): d 128, 1000 true features (40 % exclusive), Zipf-like
rates, rotated and re-scaled shared features, parent co-firing, fine-tune 4x larger, 1.5M tokens,
dict_size 2000 (2x the true features), batch 1024. "plain" is the recipe a new user starts from: A1-style
random init, a constant learning rate, no λ warm-up, no resampling.

Run: .venv/bin/python bench/bench_ground_truth.py [--passes N] [RECIPE ...]   (default: all recipes, one pass)
"""
import argparse
import tempfile
import time
from pathlib import Path

from crosscoder_utils import ActivationStore, CrossCoderConfig, TrainConfig, estimate_norm_factors, train_crosscoder
from crosscoder_utils.synthetic import SyntheticConfig, generate, score

PLAIN = dict(lr=1e-3, lr_decay_frac=0.0, l1_warmup_frac=0.0, init="random")
RECIPES = {  # name: (TrainConfig fields, CrossCoderConfig fields); everything else at the library defaults
    "relu plain (lr 1e-3 constant)": (PLAIN, dict(variant="relu")),
    "relu defaults": ({}, dict(variant="relu")),
    "relu defaults, resampling": (dict(resample_every=250), dict(variant="relu")),
    "relu defaults, random init": (dict(init="random"), dict(variant="relu")),
    "relu, 100 designated shared": ({}, dict(variant="relu", n_shared_latents=100)),
    "relu, 200 dedicated per model": ({}, dict(variant="relu", n_dedicated=200)),
    "batchtopk plain (k 8, lr 1e-3 constant)": (PLAIN, dict(variant="batchtopk", k=8)),
    "batchtopk defaults (k 8)": ({}, dict(variant="batchtopk", k=8)),
    "batchtopk, k 64->8": (dict(k_anneal_from=64), dict(variant="batchtopk", k=8)),
    "batchtopk, k 64->8, resampling": (dict(k_anneal_from=64, resample_every=250), dict(variant="batchtopk", k=8)),
    "batchtopk, k 64->8, random init": (dict(k_anneal_from=64, init="random"), dict(variant="batchtopk", k=8)),
    "batchtopk, 100 designated shared": ({}, dict(variant="batchtopk", k=8, n_shared_latents=100)),
    "batchtopk, 200 dedicated per model": ({}, dict(variant="batchtopk", k=8, n_dedicated=200)),
    "batchtopk, 200 dedicated, k 64->8": (dict(k_anneal_from=64), dict(variant="batchtopk", k=8, n_dedicated=200)),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", type=int, default=1, help="passes over the 1.5M-token store")
    parser.add_argument("recipes", nargs="*", default=list(RECIPES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(SyntheticConfig())
        store = ActivationStore.from_arrays(Path(tmp) / "store", data.activations, val_fraction=0.0)
        factors = estimate_norm_factors(store, n_batches=20)
        num_tokens = args.passes * len(store)
        print(f"{args.passes} pass(es), {num_tokens:,} tokens")
        print(f"{'recipe':<42} {'lr':>7} {'shared':>13} {'base-only':>13} {'ft-only':>13} {'false excl.':>11} {'tok/s':>8}")
        print(f"{'':<50} {'rec / class':>13} {'rec / class':>13} {'rec / class':>13}")
        for name in args.recipes:
            train_fields, cc_fields = RECIPES[name]
            cfg = TrainConfig(batch_size=1024, num_tokens=num_tokens, log_to="none", save_every=10**9, **train_fields)
            start = time.perf_counter()
            cc = train_crosscoder(cfg, store, Path(tmp) / name.replace(" ", "_"),
                                  CrossCoderConfig(dict_size=2000, dead_tokens=200_000, **cc_fields))
            seconds = time.perf_counter() - start
            r = score(cc, data.truth, factors)
            cells = [f"{r.recovered[k]:5.1%} / {r.classified[k]:5.1%}" for k in ("shared", "exclusive_0", "exclusive_1")]
            print(f"{name:<42} {cfg.resolved_lr():>7.1e} {cells[0]:>13} {cells[1]:>13} {cells[2]:>13} "
                  f"{r.false_exclusive_rate:>11.1%} {num_tokens / seconds:>8,.0f}", flush=True)


if __name__ == "__main__":
    main()
