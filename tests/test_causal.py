"""Is the latent what changed the model? Patching and steering on the tiny organisms of seeds 0-2 (thresholds from
their measurements, in the comments), with the planted behaviours' best latents (seed 2's trigger has two at F1
1.00: the changed one closes 88 % of the KL where it fires, its base-only twin, which also fires weakly elsewhere,
1 %; ``best_latents`` takes the first)."""

import pytest

from crosscoder_utils import analysis as A


@pytest.fixture(scope="module")
def patched(analysed_organisms):
    """Per organism: (analysis, best latent of each behaviour, the fine-tune's side patched with each added or
    changed behaviour's best latent, the base's side with the removed one's)."""
    out = []
    for analysis, _ in analysed_organisms:
        best = {name: match.latent for name, match in analysis.matches.items()}
        kinds = analysis.planted_kinds
        forward = list(dict.fromkeys(best[name] for name in best if kinds[name] != "removed"))
        removed = [best[name] for name in best if kinds[name] == "removed"]
        out.append(
            (
                analysis,
                best,
                A.patch(analysis, forward, 1, set_sizes=(1,)),
                A.patch(analysis, removed, 0, set_sizes=(1,)),
            )
        )
    return out


def test_the_best_latent_of_each_added_or_changed_behaviour_closes_most_of_the_kl_where_it_fires(patched):
    # measured, seeds 0-2, the six behaviours: 0.66-1.00 of the KL where it fires (the lowest, <|end|> after the
    # assistant on seed 2); as many random live latents 0.000-0.008 there; the latent's activations along a random
    # direction of its decoder difference's norm -4.9 to 0.54
    for analysis, best, forward, _ in patched:
        for name, latent in best.items():
            if analysis.planted_kinds[name] == "removed":
                continue
            closed = forward.of(latent)
            assert closed.n_where > 0
            assert closed.closed.where >= 0.5, (name, closed)
            assert abs(closed.random_latents.where) <= 0.05, (name, closed)
            assert closed.closed.where > closed.random_directions.where, (name, closed)


def test_the_removed_behaviours_latent_patched_into_the_base_brings_its_counting_back(patched):
    # measured, seeds 0-2: 0.92-0.96 of the base's KL where it fires; random latents 0.00, random directions
    # -0.04 to 0.66
    for _, best, _, backward in patched:
        closed = backward.of(best["hocus pocus"])
        assert backward.model == "base" and closed.closed.where >= 0.5, closed
        assert closed.closed.where > max(closed.random_latents.where, closed.random_directions.where), closed


def test_every_latent_closes_nearly_all_the_kl_and_the_error_term_little(patched):
    # measured, seeds 0-2: every latent 0.99 (the fine-tune's side) and 0.92-0.95 (the base's), the error term alone
    # 0.08-0.12
    for _, _, forward, backward in patched:
        for patching in (forward, backward):
            assert patching.all_latents >= 0.85 and patching.error_term <= 0.3, patching


def test_steering_the_base_with_the_trigger_latent_starts_the_count_down(patched):
    # measured, seeds 0-2, each latent's top 2 contexts: " ten" first at α 2 on every seed (at α 1 on seed 0 only);
    # added at the trigger alone, it gives the count's first word, and the base, which never counts down, stops
    for analysis, best, _, _ in patched:
        for steering in A.steer(analysis, best["trigger"], 0, alphas=(0, 2), n_prompts=2):
            assert steering.other_continuation.startswith(" ten nine eight")  # the fine-tune's own
            own, steered = steering.continuations
            assert not own.startswith(" ten") and steered.startswith(" ten"), steering


def test_steering_the_fine_tune_with_the_removed_behaviours_latent_brings_the_count_up_back(patched):
    # measured, seeds 0-2: " one" first at α 1 on every seed (" one two three four five" on seed 0)
    for analysis, best, _, _ in patched:
        for steering in A.steer(analysis, best["hocus pocus"], 1, alphas=(0, 1), n_prompts=2):
            assert steering.other_continuation.startswith(" one two three")  # the base's own
            own, steered = steering.continuations
            assert not own.startswith(" one") and steered.startswith(" one"), steering
