"""The organism's planted changes as each crosscoder variant sees them: for each planted behaviour, the latent
that picks out its tokens best (F1 at its best activation threshold) and its rank in the difference ranking;
how many behaviours have such a latent with F1 >= 0.8 among the top 20 (one latent per firing pattern, as 04
shows them); the dictionary's health (dead latents, duplicate groups: crosscoder_utils.analysis.health);
explained variance; on the store's held-out split.

Uses the demo's organism and store (outputs/, built by `make demo`, or here if missing) and 03_train's
organism-scaled training (1024 tokens per step, 2M tokens, ~10 passes, lr=None); each variant states its
dictionary size and λ (03's defaults: 192 latents, λ 0.5, tanh penalty c 0.015).

Run: .venv/bin/python bench/bench_organism_variants.py [--seeds 0 1 2] [--variants NAME ...]
"""

import argparse
import time
from pathlib import Path

from crosscoder_utils import (
    CollectConfig,
    CrossCoderConfig,
    OrganismConfig,
    TrainConfig,
    collect_activations,
    estimate_norm_factors,
    load_model_pair,
    train_crosscoder,
)
from crosscoder_utils import analysis as A
from crosscoder_utils.analysis.health import dictionary_health
from crosscoder_utils.analysis.planted import behaviour_labels
from crosscoder_utils.normalize import load_norm_factors
from crosscoder_utils.organism import build_organism

VARIANTS = {
    "relu (03's defaults)": dict(variant="relu", dict_size=192, l1_coeff=0.5, tanh_scale=0.015),
    "relu, dict 256, λ 1, plain L1": dict(variant="relu", dict_size=256, l1_coeff=1.0),
    "relu, dict 1024, λ 2": dict(variant="relu", dict_size=1024, l1_coeff=2.0),
    "relu, 16 designated shared": dict(variant="relu", dict_size=256, l1_coeff=1.0, n_shared_latents=16),
    "relu, 32 dedicated per model": dict(variant="relu", dict_size=256, l1_coeff=1.0, n_dedicated=32),
    "batchtopk (k 16)": dict(variant="batchtopk", dict_size=256, k=16),
}


def main(seeds: list[int], variants: list[str], out=Path("outputs")):
    organism = build_organism(OrganismConfig(out_dir=str(out / "organism")))
    store = collect_activations(
        CollectConfig(base_model=organism.base, finetuned_model=organism.finetuned, dataset=organism.corpus),
        out / "activations/organism",
    )
    if not (Path(store.path) / "norm.json").exists():
        estimate_norm_factors(store)
    factors = load_norm_factors(store)
    labels = behaviour_labels(store, organism)
    divergence = A.token_divergence(load_model_pair(organism.base, organism.finetuned), store, factors)
    print(f"{'variant':<30} {'seed':>4} " + " ".join(f"{name[:14]:>14}" for name in labels), end="")
    print(f" {'found':>5} {'dead':>5} {'dup groups':>10} {'EV b/ft':>11} {'s':>4}")
    print(f"{'':<36}" + " ".join(f"{'F1 / rank':>14}" for _ in labels))
    for name in variants:
        for seed in seeds:
            start = time.perf_counter()
            run = out / "bench_variants" / f"{name.replace(' ', '_').replace(',', '')}_seed{seed}"
            cc = train_crosscoder(
                TrainConfig(tokens_per_step=1024, train_tokens=2_000_000, log_to="none", log_every=100, seed=seed),
                store,
                run,
                CrossCoderConfig(dead_tokens=200_000, **VARIANTS[name]),
            )
            seconds = time.perf_counter() - start
            encoded = A.encode(cc, store, factors)
            table = A.difference_table(cc, encoded, divergence)
            health = dictionary_health(cc, encoded)
            top = A.distinct_top(table.order, 20, health.groups)
            matches = A.best_latents(encoded, labels)
            cells = [f"{m.f1:.2f} / {table.rank(m.latent)}" for m in matches.values()]
            shown = set(top.latents).union(*top.twins)
            found = sum(m.f1 >= 0.8 and m.latent in shown for m in matches.values())
            dead = len(health.dead)
            ev = "{:.3f}/{:.3f}".format(*encoded.explained_variance_per_model.tolist())
            print(f"{name:<30} {seed:>4} " + " ".join(f"{c:>14}" for c in cells), end="")
            print(f" {found:>5} {dead:>5} {len(health.groups):>10} {ev:>11} {seconds:>4.0f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    main(args.seeds, args.variants)
