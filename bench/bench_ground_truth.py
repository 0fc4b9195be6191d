"""Training quality on the hard synthetic ground truth: recovered / classified right per kind (latents
labelled as 04 labels them, by Latent Scaling on every generated token; then, for comparison, by decoder
norm alone), false exclusives, explained variance and L0 at inference (normalised units, the last 100k rows)
and tokens/s for several training recipes and crosscoder variants, side by side on the same data.

Hard default setting (SyntheticConfig defaults): d 128, 1000 true features (40 % exclusive), Zipf-like
rates, rotated and re-scaled shared features, parent co-firing, fine-tune 4x larger, 1.5M tokens,
dict_size 2000 (2x the true features), batch 1024 (synthetic.PRESETS). "*_plain" is the recipe a new user
starts from: A1-style random init, a constant learning rate, no λ warm-up, no resampling.

Run: .venv/bin/python bench/bench_ground_truth.py [--passes N] [--seed S] [--set FIELD=VALUE ...] [PRESET ...]
(default: every preset, one pass, seed 0; --set overrides a TrainConfig or CrossCoderConfig field of each)
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from crosscoder_utils import ActivationStore, estimate_norm_factors, train_crosscoder
from crosscoder_utils.analysis.encoding import encode
from crosscoder_utils.crosscoder import explained_variance
from crosscoder_utils.synthetic import PRESETS, SyntheticConfig, generate, preset, score


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", type=int, default=1, help="passes over the 1.5M-token store")
    parser.add_argument("--seed", type=int, default=0, help="seeds the ground truth and the training")
    parser.add_argument("--set", action="append", default=[], help="FIELD=VALUE over every preset (a JSON value)")
    parser.add_argument("presets", nargs="*", default=list(PRESETS), help="names from synthetic.PRESETS")
    args = parser.parse_args()
    overrides = {name: json.loads(value) for name, value in (item.split("=", 1) for item in args.set)}
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(SyntheticConfig(seed=args.seed))
        store = ActivationStore.from_arrays(Path(tmp) / "store", data.activations, val_fraction=0.0)
        factors = estimate_norm_factors(store, n_batches=20)
        train_tokens = args.passes * len(store)
        print(f"{args.passes} pass(es), {train_tokens:,} tokens, seed {args.seed}, {overrides or 'no overrides'}")
        print(
            f"{'preset':<32} {'lr':>7} {'shared':>21} {'base-only':>21} {'ft-only':>21} "
            f"{'false excl.':>11} {'EV':>6} {'L0':>5} {'tok/s':>8}"
        )
        print(f"{'':<40} {'rec / class / norm':>21} {'rec / class / norm':>21} {'rec / class / norm':>21}")
        for name in args.presets:
            cfg, cc_cfg = preset(name, train_tokens=train_tokens, seed=args.seed, **overrides)
            start = time.perf_counter()
            cc = train_crosscoder(cfg, store, Path(tmp) / name, cc_cfg)
            seconds = time.perf_counter() - start
            r = score(cc, data.truth, factors, encoded=encode(cc, store, factors, "train"))
            by_norm = score(cc, data.truth, factors)  # labelled by decoder norm, for comparison
            with torch.no_grad():
                x = data.activations[-100_000:] * factors[:, None]  # the trained crosscoder reads normalised units
                f = cc.eval().encode(x)
                ev = explained_variance(x, cc.decode(f))[0]
            cells = [
                f"{r.recovered[k]:5.1%} / {r.classified[k]:5.1%} / {by_norm.classified[k]:5.1%}"
                for k in ("shared", "base-only", "finetuned-only")
            ]
            print(
                f"{name:<32} {cfg.resolved_lr():>7.1e} {cells[0]:>21} {cells[1]:>21} {cells[2]:>21} "
                f"{r.false_exclusive_rate:>11.1%} {ev:>6.3f} {(f > 0).sum(1).float().mean():>5.1f} "
                f"{train_tokens / seconds:>8,.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
