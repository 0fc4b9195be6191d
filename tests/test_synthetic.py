"""The ground-truth generator: deterministic, and its truth is what its output shows."""

import pytest
import torch
import torch.nn.functional as F

from crosscoder_utils.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def data():
    return generate(SyntheticConfig(n_tokens=200_000))


def test_deterministic_for_a_seed():
    small = SyntheticConfig(n_tokens=5000, n_shared=60, n_exclusive=20)
    first, again = generate(small), generate(small)
    assert torch.equal(first.activations, again.activations) and torch.equal(first.truth.decoders, again.truth.decoders)
    other = generate(SyntheticConfig(n_tokens=5000, n_shared=60, n_exclusive=20, seed=1))
    assert not torch.equal(first.activations, other.activations)


def test_truth_has_the_stated_kinds_gains_and_directions(data):
    cfg, truth = SyntheticConfig(), data.truth
    assert (truth.kinds == -1).sum() == 600 and (truth.kinds == 0).sum() == 200 and (truth.kinds == 1).sum() == 200
    norms = truth.decoders.norm(dim=-1)
    assert norms[truth.kinds == 0, 1].max() == 0 and norms[truth.kinds == 1, 0].max() == 0
    shared = truth.kinds == -1
    gain = (norms[shared, 1] / norms[shared, 0] / 4.0).round(decimals=4)  # the fine-tune is 4x larger
    assert set(gain.tolist()) == {0.5, 1.0, 2.0}
    assert abs((gain != 1).float().mean() - cfg.gain_change_frac) < 0.05
    cosine = F.cosine_similarity(truth.decoders[shared, 0], truth.decoders[shared, 1], dim=-1)
    torch.testing.assert_close(cosine, torch.full_like(cosine, 0.8), atol=1e-4, rtol=0)


def test_output_shows_the_stated_firing_rates_cofiring_and_scales(data):
    truth, codes = data.truth, data.codes.to_dense()
    fires = codes > 0
    measured = fires.float().mean(0)
    independent = (truth.parents < 0) & (truth.rates > 0.005)
    torch.testing.assert_close(measured[independent], truth.rates[independent], rtol=0.1, atol=0)
    assert truth.rates.max() == pytest.approx(0.03) and truth.rates.min() == pytest.approx(0.0005)
    children = (truth.parents >= 0).nonzero().squeeze(1)
    assert abs(len(children) / 400 - 0.5) < 0.1
    parent_given_child = (fires[:, children] & fires[:, truth.parents[children]]).sum() / fires[:, children].sum()
    assert abs(parent_given_child - 0.9) < 0.03
    reconstruction = torch.einsum("tf,fmd->tmd", codes, truth.decoders)
    residual = (data.activations - reconstruction).norm(dim=-1).mean(0) / data.activations.norm(dim=-1).mean(0)
    assert residual.max() < 0.02  # only the 1 % noise is left
    scale = data.activations.norm(dim=-1).mean(0)
    assert 3 < scale[1] / scale[0] < 5
