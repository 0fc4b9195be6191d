"""Is the latent what changed the model? Patching and steering on the tiny organisms of seeds 0-2 (thresholds from
their measurements, in the comments). A behaviour's latent: of the latents tied at its best detection F1, the one
that closes the most of the KL where it fires. A perfect detection often has twins (seed 2's trigger on one box,
seed 1's on another: a changed or fine-tune-only latent closes 77-88 % of the KL where it fires, its base-only twin
1-31 %); which twin ``best_latents`` names first depends on the box the organism was built on."""

import pytest
import torch

from crosscoder_utils import analysis as A
from crosscoder_utils.analysis.planted import detection


def tied_best(analysis, name: str) -> list[int]:
    """The latents tied at behaviour ``name``'s best detection F1."""
    encoded = analysis.encoded
    on = analysis.labels[name][torch.from_numpy(encoded.rows)]
    found = detection(encoded.latent, encoded.value, on[encoded.token], encoded.dict_size, int(on.sum()))
    return (found.f1 == found.f1.max()).nonzero().squeeze(1).tolist()


@pytest.fixture(scope="module")
def patched(analysed_organisms):
    """Per organism: (analysis, each behaviour's latent, the fine-tune's side patched with the tied best latents of
    each added or changed behaviour, the base's side with the removed one's)."""
    out = []
    for analysis, _ in analysed_organisms:
        tied = {name: tied_best(analysis, name) for name in analysis.matches}
        removed = {name for name, kind in analysis.planted_kinds.items() if kind == "removed"}
        forward = A.patch(
            analysis, list(dict.fromkeys(i for n in tied if n not in removed for i in tied[n])), 1, set_sizes=(1,)
        )
        backward = A.patch(analysis, [i for n in removed for i in tied[n]], 0, set_sizes=(1,))
        best = {
            name: max(latents, key=lambda i: (backward if name in removed else forward).of(i).closed.where)
            for name, latents in tied.items()
        }
        out.append((analysis, best, forward, backward))
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
    # measured, seeds 0-2, each latent's top 2 contexts: " ten" first at α 1-2 on seeds 0 and 2, on two boxes; at α 4
    # where the change is split between twins (seed 1 on a box with avx512_bf16: the fine-tune-only latent, which
    # closes 77 % of the KL, at α 4; its base-only twin, 31 %, gives " nine eight" at α 4). Added at the trigger
    # alone, it gives the count's first word, and the base, which never counts down, stops
    for analysis, best, _, _ in patched:
        for steering in A.steer(analysis, best["trigger"], 0, alphas=(0, 2, 4), n_prompts=2):
            assert steering.other_continuation.startswith(" ten nine eight")  # the fine-tune's own
            own, *steered = steering.continuations
            assert not own.startswith(" ten") and any(s.startswith(" ten") for s in steered), steering


def test_steering_the_fine_tune_with_the_removed_behaviours_latent_brings_the_count_up_back(patched):
    # measured, seeds 0-2: " one" first at α 1 on every seed (" one two three four five" on seed 0)
    for analysis, best, _, _ in patched:
        for steering in A.steer(analysis, best["hocus pocus"], 1, alphas=(0, 1), n_prompts=2):
            assert steering.other_continuation.startswith(" one two three")  # the base's own
            own, steered = steering.continuations
            assert not own.startswith(" one") and steered.startswith(" one"), steering
