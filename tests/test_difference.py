"""The answer on the organism at small settings: the latent of each chat-template behaviour is found and
ranked near the top of the difference ranking, which the planted difference dominates."""

import datasets
import numpy as np
import torch

from crosscoder_utils import (
    CollectConfig,
    CrossCoderConfig,
    TrainConfig,
    collect_activations,
    estimate_norm_factors,
    load_model_pair,
    train_crosscoder,
)
from crosscoder_utils import analysis as A
from crosscoder_utils.organism import behaviour_labels


def test_the_ranking_leads_with_the_planted_difference(organism, tmp_path):
    cfg = CollectConfig(
        base_model=organism.base,
        finetuned_model=organism.finetuned,
        dataset=organism.corpus,
        layer=1,
        n_tokens=40_000,
        seq_len=48,
        val_fraction=0.1,
    )
    store = collect_activations(cfg, tmp_path / "store")
    factors = estimate_norm_factors(store, n_batches=10, tokens_per_batch=2048)
    train = TrainConfig(tokens_per_step=512, train_tokens=400_000, log_to="none", log_every=100)
    cc = train_crosscoder(train, store, tmp_path / "run", CrossCoderConfig(dict_size=256, dead_tokens=50_000))
    val = lambda: A.encoded_batches(cc, store, factors, "val", 4096)
    divergence = A.token_divergence(load_model_pair(organism.base, organism.finetuned), store, factors)
    table = A.difference_table(cc, val(), divergence)
    matches = A.best_latents(val(), behaviour_labels(store, organism))
    # measured over tiny organisms of seeds 0-2: chat-template F1 0.72-1.00 at ranks 8-32 of ~200 live latents
    for token in ("<|user|>", "<|assistant|>", "<|end|>"):
        assert matches[token].f1 >= 0.6, (token, matches[token])
        assert table.rank(matches[token].latent) <= 40, (token, table.rank(matches[token].latent))
    # the top of the ranking is the planted difference: latents firing mostly in chat transcripts or on the
    # trigger and its count-down (20 of the top 20 on each seed measured)
    rows = np.arange(len(store))
    kinds = np.array(datasets.load_from_disk(organism.corpus)["kind"])[store.positions(rows)[0].numpy()]
    labels = behaviour_labels(store, organism)
    planted = torch.from_numpy(kinds == "chat") | labels["trigger"] | labels["count-down"]
    on_planted = fired = 0
    for batch in val():
        active = (batch.f[:, table.order[:20]] > 0).float()
        on_planted = on_planted + active[planted[batch.rows]].sum(0)
        fired = fired + active.sum(0)
    assert ((on_planted / fired) >= 0.5).sum() >= 15
