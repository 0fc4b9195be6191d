"""The organism's planted difference as each crosscoder variant sees it: for each planted behaviour, the
latent that picks out its tokens best (F1) and its rank in the difference ranking; how many of the top 20
latents are the best latent of some behaviour; explained variance; on the store's held-out split.

Uses the demo's organism and store (outputs/, built by `make demo`, or here if missing) and 03_train's
organism-scaled settings: dict 1024, 1024 tokens per step, 2M tokens (~10 passes), lr=None, k 16.

Run: .venv/bin/python bench/bench_organism_variants.py
"""

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
from crosscoder_utils.normalize import load_norm_factors
from crosscoder_utils.organism import behaviour_labels, build_organism

VARIANTS = {
    "relu": dict(variant="relu"),
    "relu, 64 designated shared": dict(variant="relu", n_shared_latents=64),
    "relu, 128 dedicated per model": dict(variant="relu", n_dedicated=128),
    "batchtopk (k 16)": dict(variant="batchtopk", k=16),
    "batchtopk, 64 designated shared": dict(variant="batchtopk", k=16, n_shared_latents=64),
    "batchtopk, 128 dedicated per model": dict(variant="batchtopk", k=16, n_dedicated=128),
}


def main(out=Path("outputs")):
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
    print(
        f"{'variant':<36} " + " ".join(f"{name:>14}" for name in labels) + f" {'in top 20':>9} {'EV b/ft':>11} {'s':>4}"
    )
    print(f"{'':<36} " + " ".join(f"{'F1 / rank':>14}" for _ in labels))
    for name, fields in VARIANTS.items():
        start = time.perf_counter()
        run = out / "bench_variants" / name.replace(" ", "_").replace(",", "")
        cc = train_crosscoder(
            TrainConfig(tokens_per_step=1024, train_tokens=2_000_000, log_to="none", log_every=100),
            store,
            run,
            CrossCoderConfig(dict_size=1024, dead_tokens=200_000, **fields),
        )
        seconds = time.perf_counter() - start
        encoded = A.encode(cc, store, factors)
        table = A.difference_table(cc, encoded, divergence)
        matches = A.best_latents(encoded, labels)
        cells = [f"{m.f1:.2f} / {table.rank(m.latent)}" for m in matches.values()]
        in_top = len({m.latent for m in matches.values()} & set(table.order[:20].tolist()))
        ev = "{:.3f}/{:.3f}".format(*encoded.explained_variance_per_model.tolist())
        print(
            f"{name:<36} " + " ".join(f"{c:>14}" for c in cells) + f" {in_top:>9} {ev:>11} {seconds:>4.0f}", flush=True
        )


if __name__ == "__main__":
    main()
