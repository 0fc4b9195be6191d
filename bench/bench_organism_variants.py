"""The organism's planted difference as each crosscoder variant sees it: how many latents it labels
fine-tuned-only, and their precision and recall on the planted tokens (chat transcripts, the trigger and
its count-down), on the store's held-out split.

Uses the demo's organism, store and norm factors (outputs/, built by `make demo`, or here if missing) and
03_train's organism-scaled settings: dict 1024, batch 1024, 2M tokens (~10 passes), lr=None, k 16.

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
    train_crosscoder,
)
from crosscoder_utils import analysis as A
from crosscoder_utils.normalize import load_norm_factors
from crosscoder_utils.organism import build_organism, planted_labels

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
    labels = planted_labels(store, organism.corpus, organism.planted)
    print(f"{'variant':<36} {'ft-only':>8} {'precision':>10} {'chance':>7} {'recall':>7} {'EV base / ft':>13} {'s':>5}")
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
        val = lambda cc=cc: A.encoded_batches(cc, store, factors, "val", 4096)
        stats = A.latent_statistics(val())
        ft_only = ((A.latent_kinds(cc) == 1) & (stats.frequency > 0)).nonzero().squeeze(1)
        p = A.score_planted(val(), labels, ft_only) if len(ft_only) else None
        ev = "{:.3f} / {:.3f}".format(*stats.explained_variance_per_model.tolist())
        cells = f"{p.precision:>10.1%} {p.chance:>7.1%} {p.recall:>7.1%}" if p else f"{'-':>10} {'-':>7} {'-':>7}"
        print(f"{name:<36} {len(ft_only):>8} {cells} {ev:>13} {seconds:>5.0f}", flush=True)


if __name__ == "__main__":
    main()
