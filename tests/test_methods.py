"""The answer on the organism at small settings, and the baseline diffing methods beside the crosscoder: every
planted behaviour has a latent that picks out its tokens near the top of the difference ranking, and each
method is scored by one rule."""

import itertools

import pytest
import torch
from conftest import train_on_organism

from crosscoder_utils import CrossCoderConfig, OrganismConfig, TrainConfig, methods
from crosscoder_utils import analysis as A
from crosscoder_utils.analysis.explanations import MIN_F1
from crosscoder_utils.analysis.health import Health
from crosscoder_utils.organism import PLANTED_KINDS, TINY, build_organism


def brute_force_f1(score, label):
    """The best F1 of {score > t} over every threshold t between distinct scores, by enumeration."""
    best = 0.0
    for t in sorted(set(score.tolist())):
        chosen = score >= t
        hits = (chosen & label).sum().item()
        best = max(best, 2 * hits / (chosen.sum().item() + label.sum().item()))
    return best


def test_best_f1_is_the_best_threshold_and_never_splits_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (200, 4), generator=generator).float()  # many ties
    label = torch.rand(200, generator=generator) < 0.3
    expected = [brute_force_f1(scores[:, c], label) for c in range(4)]
    assert methods.best_f1(scores, label).tolist() == pytest.approx(expected)
    signed = [max(brute_force_f1(scores[:, c], label), brute_force_f1(-scores[:, c], label)) for c in range(4)]
    assert methods.best_f1(scores, label, signed=True).tolist() == pytest.approx(signed)
    perfect = label.float()[:, None] * 3 - 1  # the label itself, as a low score when signed
    assert methods.best_f1(-perfect, label, signed=True).item() == 1.0 > methods.best_f1(-perfect, label).item()


def test_logit_lens_scores_a_behaviour_by_its_tokens_best_rank():
    lists = {"base": {"promoted": [[5, 6, 7]], "suppressed": [[8, 9, 1]]}, "finetuned": {"promoted": [[4, 2, 3]]}}
    rows = methods.score_logit_lens(lists, {"a": [1, 3], "b": [0]}, seconds=1.0, n_tokens=3)
    assert [(r.behaviour, r.found, r.rank, r.best_f1) for r in rows] == [("a", True, 3, None), ("b", False, None, None)]


def compared(organism, folder):
    train = TrainConfig(tokens_per_step=512, train_tokens=400_000, log_to="none", log_every=100)
    # the demo's recipe (λ 0.5, the tanh penalty, which merges duplicates) at this scale: c 0.05, since the tiny
    # organisms' penalty terms are smaller, and 160 latents, about what their 63,000 training tokens hold (135 live
    # on average)
    crosscoder = CrossCoderConfig(dict_size=160, l1_coeff=0.5, tanh_scale=0.05, dead_tokens=50_000)
    run = train_on_organism(organism, folder, 70_000, 0.1, (10, 2048), train, crosscoder)
    analysis = A.analyse(run)
    return analysis, methods.compare(analysis, folder / "compare"), organism


@pytest.fixture(scope="module")
def organisms(organism, tmp_path_factory):
    """Tiny organisms of seeds 0-2, each analysed and compared: (analysis, comparison, organism)."""
    built = [organism] + [
        build_organism(
            OrganismConfig(out_dir=str(tmp_path_factory.mktemp(f"organism{seed}")), **{**TINY, "seed": seed})
        )
        for seed in (1, 2)
    ]
    return [compared(o, tmp_path_factory.mktemp(f"compare{seed}")) for seed, o in enumerate(built)]


def test_the_comparison_scores_every_method_on_every_behaviour(organisms, organism, tmp_path):
    analysis, comparison, _ = organisms[0]
    rows = methods.read_methods_csv(analysis.run_dir.parent / "compare/methods.csv")
    names = ["crosscoder", "diff-SAE", "PCA of Δx", "ADL", "per-token KL", "‖Δx‖", "ADL logit lens"]
    behaviours = list(organism.planted["behaviours"])
    assert [(r["method"], r["behaviour"]) for r in rows] == list(itertools.product(names, behaviours))
    assert {r["planted_kind"] for r in rows} == set(PLANTED_KINDS)
    for row in rows:
        lens = row["method"] == "ADL logit lens"
        assert (row["best_f1"] is None) == lens
        assert lens or row["found"] == (row["best_f1"] >= 0.8)
        assert row["seconds"] > 0 and (row["rank"] is None or 1 <= row["rank"] <= 20)
    assert (analysis.run_dir.parent / "compare/diff_sae/run/crosscoder.safetensors").exists()


def test_the_crosscoder_finds_the_removed_behaviour_and_never_calls_it_finetuned_only(organisms):
    # measured on tiny organisms, seeds 0-4: F1 1.00 at ranks 7-12 of the distinct top 20, labelled changed
    for _, comparison, _ in organisms:
        row = next(s for s in comparison.scores if s.method == "crosscoder" and s.behaviour == "hocus pocus")
        assert row.found and row.best_f1 >= 0.9, row
        assert comparison.crosscoder_kinds["hocus pocus"] in ("base-only", "changed")


def test_the_ranking_leads_with_every_planted_behaviour(organisms):
    analysis = organisms[0][0]
    table = next(iter(analysis.tables.values()))
    # measured over tiny organisms of seeds 0-4 (129-141 live latents), F1 at each latent's best threshold: 1.00
    # for every behaviour, ranks 1-13
    for name, match in analysis.matches.items():
        assert match.f1 >= 0.9, (name, match)
        assert table.rank(match.latent) <= 20, (name, table.rank(match.latent))


def test_the_dictionary_stays_healthy_at_small_settings(organisms):
    # measured on tiny organisms, seeds 0-4 (these settings): dead 12-19 %, duplicate groups 0-3 of 129-141 live;
    # plain L1 with 256 latents at λ 2 left dead 7-12 % and 30-34 groups of 225-239 live
    for analysis, _, _ in organisms:
        health = analysis.health
        assert health.summary() == Health.load(analysis.run_dir / "health.json").summary()  # 03's numbers, 04's
        assert health.dead_fraction <= 0.25 and len(health.groups) <= 5


def test_without_planted_labels_every_behaviour_is_explained_and_named_by_the_verdict(organisms):
    # planted.json is read here only to score. Measured on tiny organisms, seeds 0-4, rules fitted on 200k
    # training tokens and scored on the held-out ones: each behaviour's best latent has a rule naming one of its
    # tokens, detection F1 0.56-1.00 (0.69-1.00 on these seeds 0-2; the trigger's latent, which also fires on
    # "abracadabra" the object, lowest), and each behaviour's token is in a phrase of the verdict's groups
    for analysis, _, organism in organisms:
        answered = A.answer(analysis, analysis.tables["finetuned"], 20)
        phrases = " ".join(group.phrase for group in answered.groups + answered.base_groups)
        tokenizer = analysis.pair.tokenizer
        for name, match in analysis.matches.items():
            tokens = organism.planted["behaviours"][name]["tokens"]
            assert set(tokens) & set(analysis.explanations.tokens[match.latent]), (
                name,
                analysis.explanations.text[match.latent],
            )
            assert analysis.explanations.f1[match.latent] >= MIN_F1, name  # a rule, not "no simple rule"
            assert any(tokenizer.decode([token]) in phrases for token in tokens), (name, phrases)


def test_the_base_side_of_the_answer_is_the_top_quarter_the_base_writes_more(organisms):
    for analysis, _, _ in organisms:
        table = analysis.tables["finetuned"]
        base = [latent for group in A.answer(analysis, table, 20).base_groups for latent in group.latents]
        assert 0 < len(base) <= 5 and all(float(table.relative_norm[latent]) < 0.5 for latent in base)
