"""Analysis functions against independent computations on small, known crosscoders."""

import pytest
import torch

from crosscoder_utils import ActivationStore, CrossCoder, CrossCoderConfig
from crosscoder_utils import analysis as A
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
    batches = lambda: A.encoded_batches(cc, store, factors, "val", 512)
    scaling = A.latent_scaling(cc, batches(), [0], owner=1, other=0)
    torch.testing.assert_close(scaling.nu_error, torch.tensor([0.5]), atol=1e-4, rtol=0)
    torch.testing.assert_close(scaling.beta["activation"][:, 0], torch.tensor([0.5, 1.0]), atol=1e-4, rtol=0)
    stats = A.latent_statistics(batches())
    val = a[2000:]
    torch.testing.assert_close(stats.frequency, (val > 0).float().mean(0))
    torch.testing.assert_close(stats.max_activation, val.max(0).values)
    assert stats.explained_variance_per_model[1] == pytest.approx(1.0, abs=1e-5)
    assert stats.explained_variance_per_model[0] < 1
    top = A.top_activations(batches(), [1], n_top=3)
    assert top.rows[0].tolist() == (2000 + val[:, 1].topk(3).indices).tolist()
    labels = torch.zeros(len(store), dtype=torch.bool)
    labels[2000:][val[:, 0] > 0] = True  # planted = where latent 0 fires
    planted = A.score_planted(batches(), labels, [0, 1])
    assert planted.per_latent_precision[0] == 1.0 and planted.recall == 1.0


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
