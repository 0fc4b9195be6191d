"""The answer on the organism at small settings, and the baseline diffing methods beside the crosscoder: every
planted behaviour has a latent that picks out its tokens near the top of the difference ranking, and each
method is scored by one rule."""

import itertools
import re

import pytest
import torch

from crosscoder_utils import analysis as A
from crosscoder_utils import methods, seeds
from crosscoder_utils.analysis.explanations import MIN_F1
from crosscoder_utils.analysis.health import Health
from crosscoder_utils.organism import PLANTED_KINDS


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
    assert methods.best_cuts(scores, label).f1.tolist() == pytest.approx(expected)
    signed = [max(brute_force_f1(scores[:, c], label), brute_force_f1(-scores[:, c], label)) for c in range(4)]
    assert methods.best_cuts(scores, label, signed=True).f1.tolist() == pytest.approx(signed)
    perfect = label.float()[:, None] * 3 - 1  # the label itself, as a low score when signed
    assert (
        methods.best_cuts(-perfect, label, signed=True).f1.item() == 1.0 > methods.best_cuts(-perfect, label).f1.item()
    )


def test_logit_lens_scores_a_behaviour_by_its_tokens_best_rank():
    lists = {"base": {"promoted": [[5, 6, 7]], "suppressed": [[8, 9, 1]]}, "finetuned": {"promoted": [[4, 2, 3]]}}
    rows = methods.score_logit_lens(lists, {"a": [1, 3], "b": [0]}, seconds=1.0, n_tokens=3)
    assert [(r.behaviour, r.found, r.rank, r.best_f1) for r in rows] == [("a", True, 3, None), ("b", False, None, None)]


def test_the_reading_over_seeds_sets_each_seed_against_the_same_seed_of_the_other_methods():
    score = methods.MethodScore
    scores = [  # method, behaviour, found, F1, rank, seconds, seed, threshold, F1 where the score is above 0
        score("crosscoder", "a", True, 0.90, 1, 1.0, 0, 1.0, 0.5),
        score("diff-SAE", "a", True, 0.95, 2, 1.0, 0, 1.0, 0.6),
        score("PCA of Δx", "a", False, 0.50, 1, 1.0, None, 2.0, 0.3),
        score("crosscoder", "a", False, 0.70, 3, 1.0, 1, 1.5, 0.4),
        score("diff-SAE", "a", False, 0.60, 4, 1.0, 1, 1.0, 0.3),
    ]
    comparison = methods.Comparison([], [], [], scores, {"a": "added"}, {"a": ["changed", "shared"]}, None, {})
    # seed 0: 0.90 against the diff-SAE's 0.95, a tie; seed 1: 0.70 against the diff-SAE's 0.60 (PCA 0.50), a win
    sentence = methods.outcomes(comparison)["a"]
    assert sentence == (
        "(added) crosscoder ties on 1, wins on 1 of 2 seeds: F1 0.70-0.90 (#1-3, activation ≥ 1.00-1.50; where it "
        "fires at all 0.40-0.50) against 0.60-0.95 (diff-SAE); crosscoder latent changed 1, shared 1"
    )
    table = methods.score_table(comparison)
    assert (
        table["crosscoder"]["a (added)"] == "0.70-0.90 #1-3 ✓ 1 of 2" and table["PCA of Δx"]["a (added)"] == "0.50 #1"
    )
    assert methods.found_counts(comparison) == (
        "behaviours found on every training seed: crosscoder 0 of 1 (2 seeds; 1 more on some), diff-SAE 0 of 1 "
        "(2 seeds; 1 more on some), PCA of Δx 0 of 1"
    )


@pytest.fixture(scope="module")
def organisms(analysed_organisms):
    """The tiny organisms of seeds 0-2 (``analysed_organisms``), each compared (the first over two training seeds, the
    others over one): (analysis, comparison, organism)."""
    return [
        (analysis, methods.compare(analysis, analysis.run_dir.parent / "compare", n_seeds=2 - bool(seed)), organism)
        for seed, (analysis, organism) in enumerate(analysed_organisms)
    ]


def test_the_comparison_scores_every_method_on_every_behaviour_and_seed(organisms, organism):
    analysis, comparison, _ = organisms[0]
    rows = methods.read_methods_csv(analysis.run_dir.parent / "compare/methods.csv")
    names = ["crosscoder", "diff-SAE", "PCA of Δx", "ADL", "per-token KL", "‖Δx‖"]
    behaviours = list(organism.planted["behaviours"])
    expected = [(name, 0 if name in ("crosscoder", "diff-SAE") else None) for name in names]
    expected += [("crosscoder", 1), ("diff-SAE", 1), ("ADL logit lens", None)]  # the trained methods' second seed
    assert [(r["method"], r["seed"], r["behaviour"]) for r in rows] == [
        (name, seed, behaviour) for (name, seed), behaviour in itertools.product(expected, behaviours)
    ]
    assert {r["planted_kind"] for r in rows} == set(PLANTED_KINDS)
    for row in rows:
        lens = row["method"] == "ADL logit lens"
        assert (row["best_f1"] is None) == lens
        assert lens or row["found"] == (row["best_f1"] >= 0.8)
        assert row["seconds"] > 0 and (row["rank"] is None or 1 <= row["rank"] <= 20)
    for seed in (0, 1):
        assert (analysis.run_dir.parent / f"compare/diff_sae/seed-{seed}/run/crosscoder.safetensors").exists()
    assert (analysis.run_dir / "seeds/1/crosscoder.safetensors").exists()


def test_the_score_where_a_candidate_fires_at_all_is_its_f1_above_zero(organisms):
    """The margin beside the best-threshold F1: the F1 of {score > 0}, enumerated here, never above it."""
    analysis, comparison, _ = organisms[0]
    crosscoder = next(m for m in comparison.methods if m.name == "crosscoder")
    rows = torch.from_numpy(analysis.encoded.rows)
    for s in comparison.scores:
        if s.method == "crosscoder" and s.seed == 0:
            label = analysis.labels[s.behaviour][rows]
            fires = crosscoder.scores[:, s.rank - 1] > 0
            assert s.f1_positive == pytest.approx(2 * (fires & label).sum().item() / (fires.sum() + label.sum()).item())
            assert s.f1_positive <= s.best_f1 + 1e-6 and s.threshold > 0
    for name, match in analysis.matches.items():
        label = analysis.labels[name][rows]
        fires = analysis.encoded.activations([match.latent])[:, 0] > 0
        assert match.f1_firing == pytest.approx(2 * (fires & label).sum().item() / (fires.sum() + label.sum()).item())
        assert match.f1_firing <= match.f1 + 1e-6


def test_the_diff_sae_is_read_back_when_compared_again(organisms):
    analysis, _, _ = organisms[0]
    weights = analysis.run_dir.parent / "compare/diff_sae/seed-0/run/crosscoder.safetensors"
    before = weights.stat().st_mtime_ns
    again = methods.diff_sae_method(analysis, analysis.run_dir.parent / "compare/diff_sae")
    assert weights.stat().st_mtime_ns == before and again.seed == 0


def test_the_other_seeds_are_trained_once_and_scored_as_the_verdict_counts(organisms):
    analysis, _, _ = organisms[0]
    weights = analysis.run_dir / "seeds/1/crosscoder.safetensors"
    before = weights.stat().st_mtime_ns
    runs = seeds.train_seeds(analysis, 2, "cpu")  # 06 trained seed 1: read back, not trained again
    assert weights.stat().st_mtime_ns == before and [r.run.cfg.seed for r in runs] == [0, 1]
    assert runs[1].encoded.rows.tolist() == analysis.encoded.rows.tolist() and runs[1].explanations is None
    over = seeds.planted_over_seeds(runs)
    for i, run in enumerate(runs):
        table = run.tables["finetuned"]
        answered = A.Answer(A.distinct_top(table.order, 20, run.health.groups), [], [])
        said = A.verdict(table, answered, run.matches, run.mains)
        n_found = int(re.search(r"(\d+) of \d+ found in the top", said).group(1))
        assert n_found == sum(b.found[i] for b in over)
    reading = seeds.seeds_reading(over, 0.8, 20)
    assert f"on every seed for {sum(all(b.found) for b in over)} of {len(over)} behaviours" in reading


def test_the_crosscoder_finds_the_removed_behaviour_and_never_calls_it_finetuned_only(organisms):
    # measured on tiny organisms, seeds 0-4: F1 1.00 at ranks 7-12 of the distinct top 20, labelled changed
    for _, comparison, _ in organisms:
        rows = [s for s in comparison.scores if s.method == "crosscoder" and s.behaviour == "hocus pocus"]
        assert all(row.found and row.best_f1 >= 0.9 for row in rows), rows
        assert set(comparison.crosscoder_kinds["hocus pocus"]) <= {"base-only", "changed"}


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
