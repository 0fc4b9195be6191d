"""Training quality on the hard synthetic ground truth: recovered / classified right per kind, false
exclusives and tokens/s for several training recipes, side by side on the same data.

Hard default setting (SyntheticConfig defaults): d 128, 1000 true features (40 % exclusive), Zipf-like
rates, rotated and re-scaled shared features, parent co-firing, fine-tune 4x larger, 1.5M tokens, one pass,
dict_size 2000 (2x the true features), batch 1024.

Run: .venv/bin/python bench/bench_ground_truth.py [RECIPE ...]   (default: all recipes below)
"""
import sys
import tempfile
import time
from pathlib import Path

from crosscoder_utils import ActivationStore, CrossCoderConfig, TrainConfig, estimate_norm_factors, train_crosscoder
from crosscoder_utils.synthetic import SyntheticConfig, generate, score

COMMON = dict(batch_size=1024, num_tokens=1_500_000, log_to="none", log_every=100, save_every=10**9)
RECIPES = {  # name: (TrainConfig fields, CrossCoderConfig fields)
    "relu plain (lr 1e-3)": (dict(lr=1e-3), dict(variant="relu")),
    "relu lr 3e-3": (dict(lr=3e-3), dict(variant="relu")),
    "relu lr 5e-3": (dict(lr=5e-3), dict(variant="relu")),
    "relu lr 5e-3, l1 1": (dict(lr=5e-3), dict(variant="relu", l1_coeff=1.0)),
    "relu lr 1e-2": (dict(lr=1e-2), dict(variant="relu")),
    "relu lr 1e-3, data init": (dict(lr=1e-3, init="data"), dict(variant="relu")),
    "batchtopk plain (k 8, lr 1e-3)": (dict(lr=1e-3), dict(variant="batchtopk", k=8)),
    "batchtopk k 8, lr 5e-3": (dict(lr=5e-3), dict(variant="batchtopk", k=8)),
    "batchtopk k 8, lr 5e-3, data init": (dict(lr=5e-3, init="data"), dict(variant="batchtopk", k=8)),
    "batchtopk k 8, lr 5e-3, k 64->8": (dict(lr=5e-3, k_anneal_from=64), dict(variant="batchtopk", k=8)),
}


def main(names):
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(SyntheticConfig())
        store = ActivationStore.from_arrays(Path(tmp) / "store", data.activations, val_fraction=0.0)
        factors = estimate_norm_factors(store, n_batches=20)
        print(f"{'recipe':<36} {'shared':>13} {'base-only':>13} {'ft-only':>13} {'false excl.':>11} {'tok/s':>8}")
        print(f"{'':<36} {'rec / class':>13} {'rec / class':>13} {'rec / class':>13}")
        for name in names:
            train_fields, cc_fields = RECIPES[name]
            start = time.perf_counter()
            cc = train_crosscoder(TrainConfig(**COMMON, **train_fields), store, Path(tmp) / name.replace(" ", "_"),
                                  CrossCoderConfig(dict_size=2000, dead_tokens=200_000, **cc_fields))
            seconds = time.perf_counter() - start
            r = score(cc, data.truth, factors)
            cells = [f"{r.recovered[k]:5.1%} / {r.classified[k]:5.1%}" for k in ("shared", "exclusive_0", "exclusive_1")]
            print(f"{name:<36} {cells[0]:>13} {cells[1]:>13} {cells[2]:>13} {r.false_exclusive_rate:>11.1%} "
                  f"{COMMON['num_tokens'] / seconds:>8,.0f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(RECIPES))
