"""Analysis functions against independent computations on small, known crosscoders."""

import numpy as np
import pytest
import torch

from crosscoder_utils import ActivationStore, CrossCoder, CrossCoderConfig
from crosscoder_utils import analysis as A
from crosscoder_utils.analysis.explanations import explain
from crosscoder_utils.analysis.health import dictionary_health
from crosscoder_utils.synthetic import GroundTruth, score


def crosscoder_with_decoders(W_dec: torch.Tensor) -> CrossCoder:
    cc = CrossCoder(CrossCoderConfig(d_model=W_dec.shape[2], n_models=W_dec.shape[1], dict_size=len(W_dec)))
    with torch.no_grad():
        cc.W_dec.copy_(W_dec)
        cc.W_enc.copy_(W_dec.permute(1, 2, 0))
    return cc


def test_relative_norms_and_kinds():
    W_dec = torch.zeros(4, 2, 3)
    W_dec[0, 0, 0] = 1  # base-only
    W_dec[1, 1, 1] = 1  # fine-tuned-only
    W_dec[2, :, 2] = 1  # shared, same direction
    W_dec[3, 0, 0], W_dec[3, 1, 1] = 1, 3  # 3/4 of the norm in the fine-tune: still shared at 0.9
    cc = crosscoder_with_decoders(W_dec)
    torch.testing.assert_close(A.relative_decoder_norms(cc)[:, 1], torch.tensor([0.0, 1.0, 0.5, 0.75]))
    assert A.latent_kinds(cc, 0.9).tolist() == [0, 1, -1, -1]
    assert A.latent_kinds(cc, 0.7).tolist() == [0, 1, -1, 1]
    assert A.kind_counts(A.latent_kinds(cc), 2) == {"shared": 2, "base-only": 1, "finetuned-only": 1}
    torch.testing.assert_close(A.decoder_cosines(cc)[2:], torch.tensor([1.0, 0.0]))


def test_latent_scaling_labels_a_latent_whose_other_decoder_half_fits_something_else(tmp_path):
    """Latents 0 and 5 are one model's alone, but their other decoder half holds 0.3x a direction that model
    carries where they fire: 77 % of the decoder norm, shared by norm. Latent 6 leans 5:1 to the fine-tune,
    and the base holds the opposite of it (β^ε -0.5, counted as 0). Latent 1 is shared at half the gain in
    the base, 2 shared, 3 never fires, 7 writes orthogonal vectors in the two models (changed), and 4 is one
    Latent Scaling cannot measure: the base holds 5x what it writes (β^ε 5 in its own model)."""
    d = torch.eye(10)
    W_dec = torch.zeros(8, 2, 10)
    W_dec[0, 1], W_dec[0, 0] = d[0], 0.3 * d[3]
    W_dec[1, 0], W_dec[1, 1] = 0.5 * d[1], d[1]
    W_dec[2, :] = d[2]
    W_dec[3, 0] = d[3]
    W_dec[4, 0], W_dec[4, 1] = d[4], 0.2 * d[4]
    W_dec[5, 0], W_dec[5, 1] = d[5], 0.3 * d[6]
    W_dec[6, 1], W_dec[6, 0] = d[7], 0.2 * d[7]
    W_dec[7, 0], W_dec[7, 1] = d[8], d[9]
    cc = crosscoder_with_decoders(W_dec)
    with torch.no_grad():  # an encoder that reads the true activations: f = a
        cc.W_enc.zero_()
        for latent, model, direction in ((0, 1, 0), (1, 1, 1), (2, 1, 2), (5, 0, 5), (6, 1, 7), (7, 0, 8)):
            cc.W_enc[model, direction, latent] = 1
        cc.W_enc[0, 4, 4] = 0.2  # the base holds 5x latent 4's base vector (below)
        cc.b_enc[3] = -1
    g = torch.Generator().manual_seed(3)
    a = torch.rand(4000, 8, generator=g) * (torch.rand(4000, 8, generator=g) < 0.3)
    a[:, 3] = 0
    x = torch.einsum("tf,fmd->tmd", a, W_dec)
    x[:, 0] += 4 * a[:, 4:5] * d[4]
    x[:, 1] -= 1.2 * a[:, 4:5] * d[4]
    x[:, 0] -= 0.7 * a[:, 6:7] * d[7]  # and -0.5x latent 6's
    encoded = A.encode(cc, ActivationStore.from_arrays(tmp_path / "s", x, val_fraction=0.5), torch.ones(2), "val")
    expected = torch.tensor(
        [[0.0, 1.0], [1 / 3, 2 / 3], [0.5, 0.5], [1.0, 0.0], [1 / 1.2, 0.2 / 1.2], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    )
    torch.testing.assert_close(A.model_shares(cc, encoded), expected, atol=1e-5, rtol=0)
    assert A.latent_kinds(cc).tolist() == [-1, -1, -1, 0, -1, -1, -1, -1]
    assert A.latent_kinds(cc, encoded=encoded).tolist() == [1, -1, -1, 0, -1, 0, 1, -1]
    kinds = A.difference_table(cc, encoded).kind
    assert kinds == ["finetuned-only", "shared", "shared", "dead", "shared", "base-only", "finetuned-only", "changed"]


def test_latent_scaling_and_statistics_on_planted_structure(tmp_path):
    """Latent 0 is fine-tuned-only in the crosscoder, but the base carries half of it (shrinkage)."""
    d = torch.eye(4)
    W_dec = torch.zeros(3, 2, 4)
    W_dec[0, 1] = d[0]  # fine-tuned-only latent along e0
    W_dec[1, :, :] = d[1]  # shared along e1
    W_dec[2, :, :] = d[2]
    cc = crosscoder_with_decoders(W_dec)
    with torch.no_grad():
        cc.W_enc[..., 1:] /= 2  # shared latents read both models: halve so that f equals the true activation
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4000, 3, generator=g) * (torch.rand(4000, 3, generator=g) < 0.3)
    x = torch.einsum("tf,fmd->tmd", a, W_dec)
    x[:, 0] += 0.5 * a[:, :1] * d[0]  # the base holds half of latent 0's direction: its error keeps it
    store = ActivationStore.from_arrays(tmp_path / "s", x, val_fraction=0.5)
    factors = torch.ones(2)
    encoded = A.encode(cc, store, factors, "val", 512)
    scaling = A.latent_scaling(cc, encoded, [0], owner=1, other=0)
    torch.testing.assert_close(scaling.nu_error, torch.tensor([0.5]), atol=1e-4, rtol=0)
    torch.testing.assert_close(scaling.beta["activation"][:, 0], torch.tensor([0.5, 1.0]), atol=1e-4, rtol=0)
    val = a[2000:]
    torch.testing.assert_close(encoded.frequency, (val > 0).float().mean(0))
    assert encoded.l0 == pytest.approx(float((val > 0).sum(1).float().mean()))
    assert encoded.explained_variance_per_model[1] == pytest.approx(1.0, abs=1e-5)
    assert encoded.explained_variance_per_model[0] < 1
    torch.testing.assert_close(encoded.activations([2, 0], [5, 7, 1999]), val[[5, 7, 1999]][:, [2, 0]])


def planted_crosscoder_and_store(tmp_path):
    """Five latents along e0..e4 with known activations on 4000 tokens (half held out): 0 finetuned-only,
    1 base-only, 2 in both models but rotated (changed), 3 shared, 4 never active (dead)."""
    d = torch.eye(5)
    W_dec = torch.zeros(5, 2, 5)
    W_dec[0, 1] = d[0]
    W_dec[1, 0] = d[1]
    W_dec[2, 0], W_dec[2, 1] = d[2], d[3] * 0.8 + d[2] * 0.2  # cosine ~0.24
    W_dec[3, :] = d[4]
    W_dec[4, :] = d[2] + d[3]
    cc = crosscoder_with_decoders(W_dec)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4000, 5, generator=g) * (torch.rand(4000, 5, generator=g) < 0.2)
    a[:, 4] = 0
    x = torch.einsum("tf,fmd->tmd", a, W_dec)
    with torch.no_grad():  # an encoder that reads the true activations back: f = a for latents 0-3
        cc.W_enc.zero_()
        cc.W_enc[1, 0, 0] = cc.W_enc[0, 1, 1] = cc.W_enc[0, 2, 2] = cc.W_enc[0, 4, 3] = 1
        cc.b_enc[4] = -1
    return cc, ActivationStore.from_arrays(tmp_path / "s", x, val_fraction=0.5), a[2000:]


def test_difference_table_kinds_scores_and_ranking(tmp_path):
    cc, store, val = planted_crosscoder_and_store(tmp_path)
    encoded = A.encode(cc, store, torch.ones(2), "val", 512)
    kl = torch.rand(2000, generator=torch.Generator().manual_seed(2))
    kl[val[:, 1] > 0] += 5  # the models differ most where latent 1 fires
    divergence = A.TokenDivergence(np.arange(2000, 4000), kl, torch.zeros(2000), [], 0, 0.0)
    table = A.difference_table(cc, encoded, divergence, changed_cosine=0.5)
    assert table.kind == ["finetuned-only", "base-only", "changed", "shared", "dead"]
    expected = [float((val[:, i] * kl).sum() / val[:, i].sum()) for i in range(4)]
    torch.testing.assert_close(table.difference_score[:4], torch.tensor(expected))
    assert table.order[0] == 1 and sorted(table.order.tolist()) == [0, 1, 2, 3] and table.rank(4) is None
    torch.testing.assert_close(table.frequency[:4], (val > 0).float().mean(0)[:4])
    x = store.read(np.arange(2000, 4000))
    squared = (x[:, 1] - x[:, 0]).pow(2).sum(-1)  # without models: the activation difference weighs the tokens
    without = A.difference_table(cc, encoded)
    torch.testing.assert_close(without.difference_score[0], (val[:, 0] * squared).sum() / val[:, 0].sum())

    csv_path = tmp_path / "latents.csv"
    explanations = explain(encoded, store)  # the store has no token ids: no rule
    A.write_latents_csv(table, A.exclusive_latent_scaling(cc, encoded, table), explanations, csv_path)
    lines = csv_path.read_text().splitlines()
    assert lines[0] == (
        "latent,kind,frequency,relative_norm,decoder_cosine,difference_score,nu_error,nu_reconstruction,"
        "explanation,explanation_f1,"
    ) + ",".join(A.PATCH_COLUMNS)
    assert [line.split(",")[0] for line in lines[1:]] == [str(i) for i in table.order.tolist()] + ["4"]
    by_latent = {line.split(",")[0]: line.split(",") for line in lines[1:]}
    assert by_latent["0"][6] != "" and by_latent["3"][6] == "" and by_latent["4"][1] == "dead"
    assert by_latent["0"][8:10] == ["no simple rule", "0.000"] and by_latent["4"][8:10] == ["", ""]
    assert by_latent["0"][10:] == [""] * len(A.PATCH_COLUMNS)  # nothing patched
    read = A.read_latents_csv(csv_path)  # the reader gives back the rows, by column
    assert [row["latent"] for row in read] == [line.split(",")[0] for line in lines[1:]]
    assert read[-1]["kind"] == "dead" and read[0]["explanation"] == "no simple rule"


def test_best_latents_and_the_difference_they_reconstruct(tmp_path):
    cc, store, val = planted_crosscoder_and_store(tmp_path)
    encoded = A.encode(cc, store, torch.ones(2), "val", 512)
    labels = {
        "where 0 fires": torch.zeros(len(store), dtype=torch.bool),
        "half of 2": torch.zeros(len(store), dtype=torch.bool),
    }
    labels["where 0 fires"][2000:][val[:, 0] > 0] = True
    fires_2 = (val[:, 2] > 0).nonzero().squeeze(1)
    labels["half of 2"][2000 + fires_2[: len(fires_2) // 2]] = True
    matches = A.best_latents(encoded, labels)
    assert matches["where 0 fires"].latent == 0 and matches["where 0 fires"].f1 == 1.0
    half = matches["half of 2"]
    assert half.latent == 2
    # by enumeration: every threshold of latent 2's activation against the half of its firings labelled
    activation, label = val[:, 2], labels["half of 2"][2000:]
    cuts = [(activation >= t, t) for t in activation[activation > 0].unique()]
    f1, chosen, t = max((2 * (c & label).sum().item() / (c.sum().item() + label.sum().item()), c, t) for c, t in cuts)
    assert half.f1 == pytest.approx(f1) and half.threshold == pytest.approx(float(t))
    assert half.precision == pytest.approx((chosen & label).sum().item() / chosen.sum().item())
    assert half.recall == pytest.approx((chosen & label).sum().item() / label.sum().item())
    assert half.f1 >= 2 * 0.5 / 1.5  # at least what firing at all gives (precision 0.5, recall 1)
    mains = A.main_behaviours(encoded, labels)
    assert mains[0] == ("where 0 fires", 1.0) and mains[2][0] == "half of 2" and set(mains) == {0, 2}
    table = A.difference_table(cc, encoded)
    top = A.distinct_top(table.order, 2, dictionary_health(cc, encoded).groups)
    first, second = top.latents
    answered = A.Answer(top, [A.PhraseGroup("«a b»", [first, second])], [A.PhraseGroup("«c»", [second])])
    sentence = A.verdict(
        table, answered, matches, mains, planted_kinds={"where 0 fires": "added", "half of 2": "removed"}
    )
    assert top.latents == table.order[:2].tolist()  # the planted latents fire on different tokens
    kl = max(float(table.difference_score[i]) for i in top.latents)
    assert sentence.startswith(
        f"The fine-tune's predictions differ most inside «a b» (latents {first}, {second}: 2 of the top 2, KL up"
        f" to {kl:.1f} nats). On the base side (latents the base writes more), inside «c» (latent {second}: 1 of"
    )
    assert " The top 2 latents of the ranking are" in sentence
    assert f"{sum(i in mains for i in top.latents)} of them fire mostly on planted tokens" in sentence
    assert f"where 0 fires 1.00 #{table.rank(0)} {table.kind[0]}" in sentence
    expected = sum(table.kind[i] in A.EXPECTED_KINDS[k] for i, k in ((0, "added"), (2, "removed")))
    assert f"; {expected} of 2 of the kind their planting implies" in sentence
    explained = lambda latents: A.difference_explained(cc, encoded, store, torch.ones(2), latents, encoded.rows)
    assert explained([0, 1, 2, 3, 4]) == pytest.approx(1.0, abs=1e-6)  # the crosscoder reconstructs x exactly
    assert explained([3]) == pytest.approx(0.0, abs=1e-6)  # shared: writes no difference
    assert 0 < explained([0]) < 1


def test_scoring_the_truth_and_a_random_dictionary():
    g = torch.Generator().manual_seed(0)
    decoders = torch.randn(30, 2, 16, generator=g)
    kinds = torch.tensor([-1] * 20 + [0] * 5 + [1] * 5)
    decoders[20:25, 1] = 0
    decoders[25:, 0] = 0
    truth = GroundTruth(
        decoders * torch.tensor([1.0, 4.0])[None, :, None], kinds, torch.full((30,), 0.01), torch.full((30,), -1)
    )
    factors = torch.tensor([1.0, 0.25])
    perfect = score(crosscoder_with_decoders(decoders), truth, factors)
    assert set(perfect.recovered.values()) == {1.0} and set(perfect.classified.values()) == {1.0}
    assert perfect.false_exclusive_rate == 0
    random = score(crosscoder_with_decoders(torch.randn(60, 2, 16, generator=g)), truth, factors)
    assert max(random.recovered.values()) == 0


def test_latent_samples_keep_each_latents_top_and_a_uniform_sample_in_one_pass(tmp_path):
    cc, store, val = planted_crosscoder_and_store(tmp_path)
    encoded = A.encode(cc, store, torch.ones(2), "val", 300)
    samples = A.latent_samples(encoded, n_top=5, n_sample=40)
    for latent in range(4):
        top = val[:, latent].topk(5)
        torch.testing.assert_close(samples.top_values[latent], top.values)
        assert samples.top_rows[latent].tolist() == (2000 + top.indices).tolist()
        rows = samples.sample_rows[latent]
        fired = set((2000 + (val[:, latent] > 0).nonzero().squeeze(1)).tolist())
        assert len(set(rows.tolist())) == 40 and set(rows.tolist()) <= fired
        torch.testing.assert_close(samples.sample_values[latent], val[rows - 2000, latent])
        assert (samples.sample_values[latent].diff() >= 0).all()
    assert (samples.top_rows[4] == -1).all() and (samples.sample_rows[4] == -1).all()  # the dead latent
    # uniform: over many seeds the sampled activations average to the latent's mean activation
    means = [A.latent_samples(encoded, 1, 40, seed).sample_values[0].mean() for seed in range(20)]
    assert float(torch.stack(means).mean()) == pytest.approx(float(val[:, 0][val[:, 0] > 0].mean()), rel=0.05)


def test_each_finetune_of_several_is_compared_with_the_base(tmp_path):
    d = torch.eye(3)
    W_dec = torch.zeros(3, 3, 3)
    W_dec[0, 2] = d[0]  # only in the second fine-tune
    W_dec[1, 0] = d[1]  # only in the base
    W_dec[2, :] = d[2]  # everywhere
    cc = crosscoder_with_decoders(W_dec)
    x = torch.einsum("tf,fmd->tmd", torch.rand(400, 3, generator=torch.Generator().manual_seed(0)), W_dec)
    store = ActivationStore.from_arrays(tmp_path / "s", x, val_fraction=0.5)
    encoded = A.encode(cc, store, torch.ones(3))
    tables = {m: A.difference_table(cc, encoded, model_index=m) for m in (1, 2)}
    assert tables[2].kind == ["finetuned_2-only", "base-only", "shared"]
    assert tables[1].kind[1:] == ["base-only", "shared"]  # latent 0 writes into neither the base nor fine-tune 1


def test_health_counts_the_dead_latent_and_no_duplicates_among_different_latents(tmp_path):
    cc, store, _ = planted_crosscoder_and_store(tmp_path)
    health = dictionary_health(cc, A.encode(cc, store, torch.ones(2)))
    assert (health.dead, health.groups, health.live, health.effective_size) == ([4], [], 4, 4)
    assert health.dead_fraction == 0.2 and health.n_tokens == 2000


def fires_with_0(cc):
    """Latent 4 reads what latent 0 reads: it fires on the same tokens, writing another vector."""
    cc.W_enc[:, :, 4], cc.b_enc[4] = cc.W_enc[:, :, 0], cc.b_enc[0]


def writes_like_3(cc):
    """Latent 4 writes latent 3's direction (twice its size) on the tokens where latent 2 exceeds 0.5."""
    cc.W_dec[4] = 2 * cc.W_dec[3]
    cc.W_enc[:, :, 4], cc.b_enc[4] = cc.W_enc[:, :, 2], -0.5


@pytest.mark.parametrize("make,group", [(fires_with_0, [0, 4]), (writes_like_3, [3, 4])])
def test_health_groups_latents_that_fire_on_the_same_tokens_or_write_the_same_vector(tmp_path, make, group):
    cc, store, val = planted_crosscoder_and_store(tmp_path)
    with torch.no_grad():
        make(cc)
    encoded = A.encode(cc, store, torch.ones(2))
    fired = encoded.activations(range(5)) > 0
    overlap = (fired[:, group[0]] & fired[:, 4]).sum() / (fired[:, group[0]] | fired[:, 4]).sum()
    assert (overlap == 1) == (make is fires_with_0) and (overlap < 0.5) == (make is writes_like_3)
    health = dictionary_health(cc, encoded)
    assert (health.dead, health.groups, health.effective_size) == ([], [group], 4)


def test_the_distinct_top_keeps_the_highest_ranked_latent_of_each_duplicate_group():
    groups = [[1, 4], [0, 2, 5]]
    top = A.distinct_top(torch.tensor([2, 4, 0, 1, 3, 5]), 3, groups)
    assert top.latents == [2, 4, 3] and top.twins == [[0, 5], [1], []]
