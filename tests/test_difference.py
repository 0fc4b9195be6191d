"""The answer on the organism at small settings: every planted behaviour has a latent that picks out its
tokens, near the top of the difference ranking."""

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


def test_the_ranking_leads_with_every_planted_behaviour(organism, tmp_path):
    cfg = CollectConfig(
        base_model=organism.base,
        finetuned_model=organism.finetuned,
        dataset=organism.corpus,
        layer=1,
        n_tokens=70_000,
        seq_len=48,
        val_fraction=0.1,
    )
    store = collect_activations(cfg, tmp_path / "store")
    factors = estimate_norm_factors(store, n_batches=10, tokens_per_batch=2048)
    train = TrainConfig(tokens_per_step=512, train_tokens=400_000, log_to="none", log_every=100)
    cc = train_crosscoder(train, store, tmp_path / "run", CrossCoderConfig(dict_size=256, dead_tokens=50_000))
    encoded = A.encode(cc, store, factors)
    divergence = A.token_divergence(load_model_pair(organism.base, organism.finetuned), store, factors)
    table = A.difference_table(cc, encoded, divergence)
    matches = A.best_latents(encoded, behaviour_labels(store, organism))
    # measured over tiny organisms of seeds 0-6 (~235 live latents): best F1 0.51-1.00 (the trigger and the
    # two <|end|> lowest: the tiny fine-tune only half separates them from their other uses), ranks 1-9
    for name, match in matches.items():
        assert match.f1 >= 0.45, (name, match)
        assert table.rank(match.latent) <= 20, (name, table.rank(match.latent))
