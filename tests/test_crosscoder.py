import pytest
import torch

from crosscoder_utils import CrossCoder, CrossCoderConfig
from crosscoder_utils.config import metric_letter


def make(variant="relu", **kw):
    torch.manual_seed(0)
    return CrossCoder(CrossCoderConfig(d_model=6, n_models=2, variant=variant, **{"k": 3, "dict_size": 40, **kw}))


def perturbed(cc):
    with torch.no_grad():  # move away from the symmetric init so every term is non-trivial
        for p in cc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cc


def test_relu_losses_equal_a_hand_computation():
    cc = perturbed(make("relu", l1_coeff=1.5))
    x = torch.randn(5, 2, 6)
    out = cc.losses(x)
    l2 = l1 = 0.0
    f_all, x_hat_all = [], []
    for b in range(5):
        pre = sum(x[b, m] @ cc.W_enc[m] for m in range(2)) + cc.b_enc
        f = torch.clamp(pre, min=0)
        x_hat = torch.stack([sum(f[i] * cc.W_dec[i, m] for i in range(40)) + cc.b_dec[m] for m in range(2)])
        l2 += ((x[b] - x_hat) ** 2).sum() / 5
        l1 += sum(f[i] * (cc.W_dec[i, 0].norm() + cc.W_dec[i, 1].norm()) for i in range(40)) / 5
        f_all.append(f)
        x_hat_all.append(x_hat)
    x_hat = torch.stack(x_hat_all)
    ev = [
        1 - ((x[:, m] - x_hat[:, m]).var(0, unbiased=False).sum() / x[:, m].var(0, unbiased=False).sum())
        for m in range(2)
    ]
    ev_all = 1 - (x - x_hat).var(0, unbiased=False).sum() / x.var(0, unbiased=False).sum()
    torch.testing.assert_close(out.l2_loss, l2)
    torch.testing.assert_close(out.l1_loss, l1)
    torch.testing.assert_close(out.loss, l2 + 1.5 * l1)
    torch.testing.assert_close(out.l0_loss, (torch.stack(f_all) > 0).sum(1).float().mean())
    torch.testing.assert_close(out.explained_variance_per_model, torch.stack(ev))
    assert out.metrics()["explained_variance_A"] == pytest.approx(ev[0].item(), rel=1e-4)  # A the base
    assert out.metrics()["explained_variance_B"] == pytest.approx(ev[1].item(), rel=1e-4)
    torch.testing.assert_close(out.explained_variance, ev_all)
    assert out.aux_loss == 0


def test_batchtopk_keeps_exactly_k_times_batch_by_score():
    cc = perturbed(make("batchtopk", k=3, aux_coeff=0.0, norm_penalty=0.0)).train()
    x = torch.randn(16, 2, 6)
    f = cc.encode(x)
    pre = torch.relu(torch.einsum("bmd,mdl->bl", x, cc.W_enc) + cc.b_enc)
    scores = pre * (cc.W_dec.norm(dim=-1).sum(-1))
    kept = torch.zeros(16 * 40, dtype=torch.bool)
    kept[scores.flatten().topk(3 * 16).indices] = True
    assert (f > 0).sum() == 3 * 16
    assert torch.equal(f > 0, kept.view(16, 40))
    torch.testing.assert_close(f[f > 0], pre[f > 0])  # the unscaled activation is stored
    out = cc.losses(x)
    torch.testing.assert_close(out.loss, out.l2_loss)  # no L1 term in the BatchTopK loss
    # rows that hold many of the batch's largest scores take the exact path too
    x = torch.randn(16, 2, 6) * 0.01
    x[0] *= 1000
    f = cc.encode(x)
    assert (f > 0).sum() == 48 and (f[0] > 0).sum() >= 6


@pytest.mark.parametrize("sparse_path", [True, False])
def test_batchtopk_keeps_every_positive_score_when_the_batch_has_fewer_than_k_per_row(sparse_path):
    # one row holds all the batch's positive scores, more than the per-row candidates (2k) but fewer than
    # k·B: training keeps every one of them (a sparse batch, as a decoder-norm penalty makes them)
    cc = make("batchtopk", k=3, dict_size=64).train()
    cc.sparse_path = sparse_path
    with torch.no_grad():
        cc.b_enc.zero_()
    x = torch.zeros(16, 2, 6)
    x[0] = torch.randn(2, 6, generator=torch.Generator().manual_seed(0)) * 10
    pre = cc.pre_activations(x)
    positive = (pre > 0).sum()
    assert 2 * 3 < positive < 3 * 16
    assert cc.losses(x).l0_loss * 16 == positive
    scores = pre * cc.selection_weights()
    assert cc.threshold == scores[scores > 0].min()  # the smallest kept score, not the k·B-th (0)


def test_batchtopk_threshold_agrees_with_training_selection():
    cc = make("batchtopk", k=4, aux_coeff=0.0).train()
    g = torch.Generator().manual_seed(1)
    directions = torch.randn(60, 2, 6, generator=g)
    data = lambda n: (torch.rand(n, 60, generator=g) < 0.05).float() @ directions.flatten(1)
    optimizer = torch.optim.Adam(cc.parameters(), lr=3e-3)
    for _ in range(300):
        loss = cc.losses(data(256).view(-1, 2, 6)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    x = data(4096).view(-1, 2, 6)
    train_active = cc.encode(x) > 0
    cc.eval()
    eval_active = cc.encode(x) > 0
    assert abs(eval_active.sum(1).float().mean() - 4) < 0.6  # L0 at inference within 15 % of k
    assert (train_active & eval_active).sum() / train_active.sum() > 0.9
    # inference is per token: a token's code does not depend on its batch
    torch.testing.assert_close(cc.encode(x[:7]), cc.encode(x)[:7])


def test_aux_loss_touches_only_dead_latents_and_gradients_reach_everything():
    cc = perturbed(make("batchtopk", k=2, aux_coeff=1.0, dead_tokens=8, k_aux=3)).train()
    x = torch.randn(8, 2, 6)
    cc.losses(x)  # 8 tokens seen: every latent that did not fire is now dead
    dead = cc.dead_latents()
    assert 0 < dead.sum() < 40
    out = cc.losses(x)
    assert out.aux_loss > 0
    cc.zero_grad()
    out.aux_loss.backward()
    assert cc.W_dec.grad[~dead].abs().sum() == 0 and cc.W_dec.grad[dead].abs().sum() > 0
    assert cc.W_enc.grad[..., ~dead].abs().sum() == 0 and cc.W_enc.grad[..., dead].abs().sum() > 0
    cc.zero_grad()
    cc.losses(x).loss.backward()
    for m in range(2):
        assert cc.W_enc.grad[m].abs().sum() > 0 and cc.W_dec.grad[:, m].abs().sum() > 0
    assert cc.b_enc.grad.abs().sum() > 0 and cc.b_dec.grad.abs().sum() > 0


@pytest.mark.parametrize("sparse_path", [True, False])
def test_batchtopk_training_step_equals_a_dense_reference_on_either_path(sparse_path):
    # k=2 overrides the config's 3, as the k-annealing schedule does
    sparse = perturbed(make("batchtopk", k=3, dict_size=64, aux_coeff=0.0, norm_penalty=0.0)).train()
    sparse.sparse_path = sparse_path
    dense = make("batchtopk", k=3, dict_size=64, aux_coeff=0.0, norm_penalty=0.0).train()
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(16, 2, 6)
    out = sparse.losses(x, k=2)
    out.loss.backward()
    pre = torch.relu(torch.einsum("bmd,mdl->bl", x, dense.W_enc) + dense.b_enc)
    scores = pre * dense.W_dec.norm(dim=-1).sum(-1)
    mask = torch.zeros(16 * 64)
    mask[scores.detach().flatten().topk(32).indices] = 1
    f = pre * mask.view(16, 64)
    x_hat = torch.einsum("bl,lmd->bmd", f, dense.W_dec) + dense.b_dec
    ((x - x_hat) ** 2).sum((1, 2)).mean().backward()
    torch.testing.assert_close(out.l2_loss, ((x - x_hat) ** 2).sum((1, 2)).mean())
    for name, param in sparse.named_parameters():
        torch.testing.assert_close(param.grad, dict(dense.named_parameters())[name].grad, msg=name)


@pytest.mark.parametrize("variant", ["relu", "batchtopk"])
def test_folded_crosscoder_reads_raw_activations_and_round_trips(tmp_path, variant):
    cc = perturbed(make(variant, k=3)).train()
    raw = torch.randn(32, 2, 6) * torch.tensor([0.5, 7.0])[None, :, None]
    factors = torch.tensor([2.0, 1 / 7])
    cc.encode(torch.randn(32, 2, 6))  # learn a threshold (on other data: no score sits exactly on it)
    cc.eval()
    folded = cc.fold_norm_factors(factors)
    torch.testing.assert_close(folded.encode(raw), cc.encode(raw * factors[None, :, None]))
    torch.testing.assert_close(folded(raw), cc(raw * factors[None, :, None]) / factors[None, :, None])
    torch.testing.assert_close(folded.decoder_norms(), cc.decoder_norms())
    folded.save(tmp_path)
    loaded = CrossCoder.load(tmp_path)
    assert loaded.cfg == cc.cfg
    torch.testing.assert_close(loaded(raw), folded(raw))
    with pytest.raises(ValueError, match="already folded"):
        folded.fold_norm_factors(factors)


def test_batchtopk_k_can_be_overridden_for_annealing():
    cc = perturbed(make("batchtopk", k=2, aux_coeff=0.0)).train()
    x = torch.randn(16, 2, 6)
    assert cc.losses(x).l0_loss == 2 and cc.losses(x, k=5).l0_loss == 5


PARTITION = dict(n_shared_latents=6, n_dedicated=5, shared_penalty_ratio=0.2)  # tied 0-5, model 0: 6-10, model 1: 11-15


@pytest.mark.parametrize("variant", ["relu", "batchtopk"])
def test_partition_constraints_stay_exact_through_adam_steps(variant):
    cc = make(variant, aux_coeff=1.0, dead_tokens=32, **PARTITION).train()
    start = cc.W_dec.detach().clone()
    optimizer = torch.optim.Adam(cc.parameters(), lr=1e-2)
    for _ in range(30):
        x = torch.randn(16, 2, 6) * torch.tensor([1.0, 3.0])[None, :, None]
        cc.losses(x).loss.backward()
        torch.nn.utils.clip_grad_norm_(cc.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    assert variant == "relu" or cc.dead_latents().any()  # the auxiliary loss took part
    assert torch.equal(cc.W_dec[:6, 0], cc.W_dec[:6, 1]) and not torch.equal(cc.W_dec[:6], start[:6])
    for model, latents in ((0, slice(6, 11)), (1, slice(11, 16))):
        other = 1 - model
        assert (cc.W_dec[latents, other] == 0).all() and (cc.W_enc[other, :, latents] == 0).all()
        assert not torch.equal(cc.W_dec[latents, model], start[latents, model])
    assert cc.owner[:16].tolist() == [-1] * 6 + [0] * 5 + [1] * 5 and (cc.owner[16:] == -1).all()


def test_designated_shared_latents_cost_less_or_bypass_the_top_k():
    x = torch.randn(16, 2, 6)
    relu = make("relu", l1_coeff=1.0, **PARTITION)
    weight = torch.ones(40)
    weight[:6] = 0.2
    f = relu.encode(x)
    out = relu.losses(x)
    torch.testing.assert_close(out.loss - out.l2_loss, (f * relu.W_dec.norm(dim=-1).sum(-1) * weight).sum(-1).mean())
    batchtopk = make("batchtopk", k=3, norm_penalty=0.0, **PARTITION).train()
    pre = batchtopk.pre_activations(x)
    kept = torch.zeros(16, 40, dtype=torch.bool)
    ordinary = torch.zeros(16 * 34, dtype=torch.bool)
    ordinary[(pre[:, 6:] * batchtopk.W_dec[6:].norm(dim=-1).sum(-1)).flatten().topk(48).indices] = True
    kept[:, 6:] = ordinary.view(16, 34)
    kept[:, :6] = pre[:, :6] > 0  # the designated shared latents are active wherever their ReLU is
    assert kept[:, :6].any()
    assert torch.equal(batchtopk.encode(x) > 0, kept)
    out = batchtopk.losses(x, l1_coeff=1.0)  # the sparse training path keeps the same entries
    assert out.l0_loss == kept.sum() / 16
    f = batchtopk.encode(x)  # only the designated shared latents pay an L1, at the reduced ratio
    torch.testing.assert_close(
        out.loss - out.l2_loss, (f[:, :6] * batchtopk.W_dec[:6].norm(dim=-1).sum(-1) * 0.2).sum(-1).mean()
    )
    batchtopk.eval()
    assert torch.equal(batchtopk.encode(x)[:, :6] > 0, pre[:, :6] > 0)


@pytest.mark.parametrize("variant", ["relu", "batchtopk"])
def test_without_shared_or_dedicated_latents_losses_and_gradients_equal_the_plain_variant(variant):
    plain = perturbed(make(variant, aux_coeff=1.0, dead_tokens=8)).train()
    zero = make(
        variant, aux_coeff=1.0, dead_tokens=8, n_shared_latents=0, n_dedicated=0, shared_penalty_ratio=0.5
    ).train()
    zero.load_state_dict(plain.state_dict())
    for _ in range(2):  # the second step has dead latents, so the auxiliary loss is compared too
        x = torch.randn(16, 2, 6)
        a, b = plain.losses(x), zero.losses(x)
        a.loss.backward()
        b.loss.backward()
        for name in ("loss", "l1_loss", "aux_loss"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        for (name, p), q in zip(plain.named_parameters(), zero.parameters()):
            assert torch.equal(p.grad, q.grad), name
    assert variant == "relu" or b.aux_loss > 0


def test_the_metrics_name_each_model_by_letter():
    torch.manual_seed(0)
    metrics = CrossCoder(CrossCoderConfig(d_model=6, n_models=3, dict_size=30)).losses(torch.randn(16, 3, 6)).metrics()
    assert list(metrics) == [
        *("loss", "l2_loss", "l1_loss", "penalty", "l0_loss", "aux_loss", "explained_variance"),
        *("explained_variance_A", "explained_variance_B", "explained_variance_C"),
    ]
    assert [metric_letter(m) for m in (0, 1, 2, 25, 26, 27)] == ["A", "B", "C", "Z", "AA", "AB"]


def test_partition_with_three_models():
    torch.manual_seed(0)
    cc = CrossCoder(CrossCoderConfig(d_model=6, n_models=3, dict_size=30, n_shared_latents=3, n_dedicated=2)).train()
    assert cc.owner[:9].tolist() == [-1] * 3 + [0, 0, 1, 1, 2, 2]
    optimizer = torch.optim.Adam(cc.parameters(), lr=1e-2)
    for _ in range(5):
        cc.losses(torch.randn(16, 3, 6)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(cc.W_dec[:3, 0], cc.W_dec[:3, 1]) and torch.equal(cc.W_dec[:3, 0], cc.W_dec[:3, 2])
    for model in range(3):
        mine = slice(3 + 2 * model, 5 + 2 * model)
        others = [m for m in range(3) if m != model]
        assert (cc.W_dec[mine][:, others] == 0).all() and (cc.W_enc[others][:, :, mine] == 0).all()
        assert (cc.W_dec[mine, model] != 0).any()


def test_batchtopk_norm_penalty_adds_the_relu_term_on_the_selected_latents():
    plain = make("batchtopk", k=3, dict_size=64, aux_coeff=0.0, norm_penalty=0.0).train()
    penalised = make("batchtopk", k=3, dict_size=64, aux_coeff=0.0, norm_penalty=0.1).train()
    penalised.load_state_dict(plain.state_dict())
    x = torch.randn(16, 2, 6)
    a, b = plain.losses(x, l1_coeff=2.0), penalised.losses(x, l1_coeff=2.0)
    torch.testing.assert_close(a.loss, a.l2_loss)  # plain BatchTopK: no L1 at all
    torch.testing.assert_close(b.l1_loss, a.l1_loss)  # the same selection
    torch.testing.assert_close(b.loss, b.l2_loss + 2.0 * 0.1 * b.l1_loss)
    torch.testing.assert_close(b.penalty, 0.1 * b.l1_loss)  # the term the training curves plot


def test_tanh_penalty_equals_a_hand_computation():
    cc = perturbed(make("relu", l1_coeff=1.5, tanh_scale=0.3))
    x = torch.randn(5, 2, 6)
    out = cc.losses(x)
    f = cc.encode(x)
    scores = f * cc.W_dec.norm(dim=-1).sum(-1)
    penalty = sum(torch.tanh(0.3 * scores[b, i]) / 0.3 for b in range(5) for i in range(40)) / 5
    torch.testing.assert_close(out.loss, out.l2_loss + 1.5 * penalty)
    torch.testing.assert_close(out.penalty, penalty)
    torch.testing.assert_close(out.l1_loss, scores.sum() / 5)  # the logged L1 stays the plain one
    assert penalty < out.l1_loss  # tanh(c·s)/c < s for s > 0: large activations cost less


def test_batchtopk_ignores_tanh_scale():
    plain = perturbed(make("batchtopk", k=3, aux_coeff=0.0)).train()
    tanh = make("batchtopk", k=3, aux_coeff=0.0, tanh_scale=0.3).train()
    tanh.load_state_dict(plain.state_dict())
    x = torch.randn(16, 2, 6)
    assert torch.equal(plain.losses(x).loss, tanh.losses(x).loss)
