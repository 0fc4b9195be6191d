"""Training quality on a medium-hard ground truth (Zipf-like rates, rotated and re-scaled shared features,
exclusive features co-firing with shared parents, a 4x larger fine-tune): the project's defaults against
the plain recipe, batchtopk's defaults against BatchTopK as published, a dedicated partition against the
same batchtopk crosscoder without one, and BatchTopK's exclusive latents labelled by Latent Scaling (as 04
labels them) against by decoder norm."""

import functools
from pathlib import Path

import pytest

from crosscoder_utils import ActivationStore, estimate_norm_factors, train_crosscoder
from crosscoder_utils.analysis.encoding import encode
from crosscoder_utils.synthetic import SyntheticConfig, generate, preset, score

MEDIUM = SyntheticConfig(d_model=64, n_shared=150, n_exclusive=50, max_rate=0.05, min_rate=0.002, n_tokens=300_000)
SCALED = dict(tokens_per_step=512, train_tokens=300_000, log_every=100, dict_size=500, dead_tokens=50_000)  # one pass


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    data = generate(MEDIUM)
    store = ActivationStore.from_arrays(tmp_path_factory.mktemp("medium") / "store", data.activations, val_fraction=0.0)
    factors = estimate_norm_factors(store, n_batches=10)

    @functools.cache  # a recipe two tests compare against is trained once
    def trained(name, **overrides):
        cfg, cc_cfg = preset(name, **SCALED, **overrides)
        run_dir = Path(store.path).parent / "-".join([name, *(f"{key}={value}" for key, value in overrides.items())])
        return train_crosscoder(cfg, store, run_dir, cc_cfg)

    def train(name, latent_scaling=False, **overrides):
        """The recipe's score, its latents labelled by decoder norm (what training shapes) or, as 04 labels
        them, by Latent Scaling on the store."""
        cc = trained(name, **overrides)
        return score(cc, data.truth, factors, encoded=encode(cc, store, factors, "train") if latent_scaling else None)

    return train, train("relu")


def mean_exclusive(values: dict) -> float:
    return (values["base-only"] + values["finetuned-only"]) / 2


def test_defaults_recover_most_features_and_beat_the_plain_recipe(medium):
    train, defaults = medium
    # the plain recipe: A1-style random init, constant lr (1e-3, ~3x the literature's 5e-5 x steps budget), no λ warm-up
    plain = train("relu_plain")
    assert min(defaults.classified.values()) >= 0.8, defaults
    assert defaults.false_exclusive_rate <= 0.02, defaults
    for kind in defaults.recovered:
        assert defaults.recovered[kind] >= plain.recovered[kind] + 0.15, (kind, defaults, plain)


def test_batchtopk_defaults_label_exclusive_features_exclusive(medium):
    train, _ = medium
    # BatchTopK as published: no decoder-norm penalty, no k annealing (measured, seeds 0-2: the defaults
    # classify 41-56 points more of the exclusive features right, 0 false exclusives either way)
    classic = train("batchtopk_classic")
    defaults = train("batchtopk")
    assert mean_exclusive(defaults.classified) >= mean_exclusive(classic.classified) + 0.25, (defaults, classic)
    assert defaults.false_exclusive_rate <= 0.02, defaults


def test_a_dedicated_partition_classifies_more_exclusive_features_right(medium):
    train, _ = medium
    # in BatchTopK as published (measured, seeds 0-2: +13 to +20 points; over the batchtopk defaults, which
    # already classify 88-94 % right, the partition adds 0-4 points)
    classic = train("batchtopk_classic")
    dedicated = train("batchtopk_classic", n_dedicated=100)
    assert mean_exclusive(dedicated.classified) >= mean_exclusive(classic.classified) + 0.1, (dedicated, classic)
    assert dedicated.false_exclusive_rate <= 0.02


def test_latent_scaling_labels_the_exclusive_features_batchtopk_recovers(medium):
    train, _ = medium
    # BatchTopK as published leaves part of each exclusive latent's decoder norm in the other model, fitting
    # what that model holds where the latent fires (measured, seeds 0-2: the exclusive kinds classified right
    # 64 / 78 / 71 % by Latent Scaling, every one recovered, against 34 / 52 / 36 % by decoder norm)
    by_norm = train("batchtopk_classic")
    by_scaling = train("batchtopk_classic", latent_scaling=True)
    assert mean_exclusive(by_scaling.classified) >= mean_exclusive(by_norm.classified) + 0.15, (by_scaling, by_norm)
    assert by_scaling.false_exclusive_rate <= 0.02, by_scaling


def test_latent_scaling_labels_few_of_relus_shared_latents_exclusive(medium):
    train, _ = medium
    # weak latents of shared features get β^ε of any size; measured, seeds 0-2: 0.9 / 0 / 0 % false
    # exclusives (4.8 % on seed 2 before weak latents were left to the decoder norms)
    assert train("relu", latent_scaling=True).false_exclusive_rate <= 0.02
