"""Reading a trained crosscoder: which latents are exclusive to a model, whether they truly are, and how
well the crosscoder stands in for each model.

Everything is computed in normalised units (the space the crosscoder was trained in) on the store's
held-out ``val`` split unless said otherwise.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import einsum
from tqdm.auto import tqdm

from .collect import TracedPair, keep_mask, load_texts, tokenize
from .config import CollectConfig, model_roles
from .crosscoder import CrossCoder
from .models import ModelPair
from .store import ActivationStore


@torch.no_grad()
def relative_decoder_norms(cc: CrossCoder) -> torch.Tensor:
    """[dict_size, n_models]: each model's share ‖d_m‖ / Σ_m' ‖d_m'‖ of a latent's decoder norm,
    in normalised units. For two models column 1 is the usual ‖d_ft‖ / (‖d_base‖ + ‖d_ft‖)."""
    norms = cc.decoder_norms()
    return norms / norms.sum(-1, keepdim=True).clamp(min=1e-12)


def latent_kinds(cc: CrossCoder, exclusive_share: float = 0.9) -> torch.Tensor:
    """int64 [dict_size]: m where model m holds at least ``exclusive_share`` of the decoder norm, else -1
    (shared). For two models: base-only when the relative norm is ≤ 1 − share, fine-tuned-only when ≥ share."""
    share, owner = relative_decoder_norms(cc).max(dim=-1)
    return torch.where(share >= exclusive_share, owner, -1)


def kind_name(kind: int, n_models: int) -> str:
    """``shared`` for -1, else ``<role>-only`` (``base-only``, ``finetuned-only``) for model ``kind``."""
    return "shared" if kind == -1 else f"{model_roles(n_models)[kind]}-only"


def kind_counts(kinds: torch.Tensor, n_models: int) -> dict[str, int]:
    """Latents of each kind, by name."""
    return {kind_name(kind, n_models): int((kinds == kind).sum()) for kind in range(-1, n_models)}


@torch.no_grad()
def decoder_cosines(cc: CrossCoder, first: int = 0, second: int = 1) -> torch.Tensor:
    """[dict_size]: cosine between each latent's decoder vectors for two models."""
    return F.cosine_similarity(cc.W_dec[:, first], cc.W_dec[:, second], dim=-1)


@torch.no_grad()
def random_pair_cosines(
    cc: CrossCoder, n: int = 10_000, seed: int = 0, first: int = 0, second: int = 1
) -> torch.Tensor:
    """[n]: cosines between model-``first`` and model-``second`` decoder vectors of two different latents (baseline)."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(cc.cfg.dict_size, (n,), generator=g)
    j = (i + torch.randint(1, cc.cfg.dict_size, (n,), generator=g)) % cc.cfg.dict_size
    return F.cosine_similarity(cc.W_dec[i, first], cc.W_dec[j, second], dim=-1)


class Batch(NamedTuple):
    rows: np.ndarray
    """Store rows of the batch."""
    x: torch.Tensor
    """[batch, n_models, d_model] normalised activations."""
    f: torch.Tensor
    """[batch, dict_size] latent activations."""
    x_hat: torch.Tensor
    """[batch, n_models, d_model] reconstruction."""


@torch.no_grad()
def encoded_batches(
    cc: CrossCoder,
    store: ActivationStore,
    factors: torch.Tensor,
    split: str = "val",
    tokens_per_batch: int = 4096,
    max_tokens: int | None = None,
) -> Iterator[Batch]:
    """The split in store order, normalised, encoded and decoded by ``cc`` (in eval mode)."""
    cc.eval()
    rows = store.split_range(split)
    stop = rows.stop if max_tokens is None else min(rows.stop, rows.start + max_tokens)
    if stop <= rows.start:
        raise ValueError(f"the store's {split!r} split is empty; collect a store with val_fraction > 0")
    for start in tqdm(range(rows.start, stop, tokens_per_batch), desc=f"encoding {split}"):
        indices = np.arange(start, min(start + tokens_per_batch, stop))
        x = store.read(indices) * factors[None, :, None]
        f = cc.encode(x)
        yield Batch(indices, x, f, cc.decode(f))


class LatentStatistics(NamedTuple):
    frequency: torch.Tensor
    """[dict_size] fraction of tokens on which each latent fires."""
    max_activation: torch.Tensor
    """[dict_size] largest activation."""
    explained_variance_per_model: torch.Tensor
    """[n_models] on the split."""
    l0: float
    """Mean active latents per token."""
    n_tokens: int


@torch.no_grad()
def latent_statistics(batches: Iterator[Batch]) -> LatentStatistics:
    fired = max_act = None
    n, l0 = 0, 0.0
    sums = None  # Σ err, Σ err², Σ x, Σ x² per model and dimension, for Σ Var = Σ (E[v²] − E[v]²)
    for batch in batches:
        active = batch.f > 0
        fired = active.sum(0) if fired is None else fired + active.sum(0)
        top = batch.f.max(0).values
        max_act = top if max_act is None else torch.maximum(max_act, top)
        l0 += active.sum().item()
        n += len(batch.f)
        err, x = (batch.x - batch.x_hat).double(), batch.x.double()
        new = [err.sum(0), err.pow(2).sum(0), x.sum(0), x.pow(2).sum(0)]
        sums = new if sums is None else [a + b for a, b in zip(sums, new)]
    err_sum, err_sq, x_sum, x_sq = sums
    var_err = (err_sq / n - (err_sum / n) ** 2).sum(-1)
    var_x = (x_sq / n - (x_sum / n) ** 2).sum(-1)
    return LatentStatistics(fired.float() / n, max_act, (1 - var_err / var_x).float(), l0 / n, n)


class TopActivations(NamedTuple):
    latents: torch.Tensor
    """[L] the latents asked for."""
    values: torch.Tensor
    """[L, n_top] their largest activations, descending."""
    rows: torch.Tensor
    """[L, n_top] the store rows where they occurred."""


@torch.no_grad()
def top_activations(batches: Iterator[Batch], latents, n_top: int = 10) -> TopActivations:
    latents = torch.as_tensor(latents, dtype=torch.long)
    values = torch.full((len(latents), n_top), -1.0)
    rows = torch.full((len(latents), n_top), -1, dtype=torch.long)
    for batch in batches:
        both_values = torch.cat([values, batch.f[:, latents].T], dim=1)
        both_rows = torch.cat([rows, torch.as_tensor(batch.rows).expand(len(latents), -1)], dim=1)
        values, order = both_values.topk(n_top, dim=1)
        rows = both_rows.gather(1, order)
    return TopActivations(latents, values, rows)


def context(store: ActivationStore, tokenizer, row: int, width: int = 8) -> str:
    """The token at a store row in its sequence, ``width`` stored tokens either side, as text: a «b» c."""
    window = np.arange(max(0, row - width), min(len(store), row + width + 1))
    seq, _ = store.positions(window)
    window = window[(seq == seq[window == row]).numpy()]
    tokens = store.token_ids(window).tolist()
    return "".join(f"«{tokenizer.decode([t])}»" if r == row else tokenizer.decode([t]) for r, t in zip(window, tokens))


class LatentScaling(NamedTuple):
    """Closed-form β per latent (Minder et al. 2025, 'Overcoming Sparsity Artifacts in Crosscoders').

    For a latent j exclusive to model o with decoder direction d = W_dec[j, o], and a target y_m(t) per
    model m, β_j,m = Σ_t f_j(t) ⟨d, y_m(t)⟩ / (‖d‖² Σ_t f_j(t)²): how much of f_j·d the target holds.
    Targets: the activation x_m; the reconstruction without the latent, x̂_m − f_j W_dec[j, m]; and the
    error with the latent's own contribution, x_m − x̂_m + f_j W_dec[j, m]. For the other model e,
    ν^ε = β^error_e / β^error_o and ν^r = β^reconstruction_e / β^reconstruction_o. Both near 0: the
    latent is genuinely exclusive. High ν^ε: the other model's error still holds it (Complete
    Shrinkage); high ν^r: other latents reconstruct it in the other model (Latent Decoupling).
    """

    latents: torch.Tensor
    """[J] the latents scaled."""
    beta: dict
    """target name -> [n_models, J] β for each model."""
    nu_error: torch.Tensor
    """[J] ν^ε."""
    nu_reconstruction: torch.Tensor
    """[J] ν^r."""


@torch.no_grad()
def latent_scaling(cc: CrossCoder, batches: Iterator[Batch], latents, owner: int, other: int) -> LatentScaling:
    latents = torch.as_tensor(latents, dtype=torch.long)
    direction = cc.W_dec[latents, owner]  # [J, d]
    own = einsum(direction, cc.W_dec[latents], "j d, j m d -> m j")  # ⟨d, W_dec[j, m]⟩
    sums = {name: 0.0 for name in ("activation", "reconstruction", "error")}
    f_squared = 0.0
    for batch in batches:
        f = batch.f[:, latents].double()
        on_x = einsum(batch.x, direction, "b m d, j d -> b m j").double()
        on_hat = einsum(batch.x_hat, direction, "b m d, j d -> b m j").double()
        contribution = f[:, None, :] * own[None].double()
        targets = {"activation": on_x, "reconstruction": on_hat - contribution, "error": on_x - on_hat + contribution}
        for name, projection in targets.items():
            sums[name] = sums[name] + (f[:, None, :] * projection).sum(0)
        f_squared = f_squared + f.pow(2).sum(0)
    denominator = direction.double().pow(2).sum(-1) * f_squared
    beta = {name: (value / denominator).float() for name, value in sums.items()}
    ratio = lambda name: beta[name][other] / beta[name][owner]
    return LatentScaling(latents, beta, ratio("error"), ratio("reconstruction"))


class PlantedScore(NamedTuple):
    precision: float
    """Of the latents' firings, the fraction on planted tokens."""
    recall: float
    """Of the planted tokens, the fraction on which at least one of the latents fires."""
    chance: float
    """Fraction of planted tokens among all tokens (the precision of latents firing at random)."""
    per_latent_precision: torch.Tensor
    """[J] each latent's precision (nan for a latent that never fires)."""


@torch.no_grad()
def score_planted(batches: Iterator[Batch], labels: torch.Tensor, latents) -> PlantedScore:
    """How well latents (e.g. the fine-tuned-only ones) pick out planted tokens; ``labels`` is bool
    [len(store)] (``organism.planted_labels``)."""
    latents = torch.as_tensor(latents, dtype=torch.long)
    on_planted = fired_total = torch.zeros(len(latents))
    covered = n_planted = n = 0
    for batch in batches:
        planted = labels[batch.rows]
        fired = batch.f[:, latents] > 0
        on_planted = on_planted + fired[planted].sum(0)
        fired_total = fired_total + fired.sum(0)
        covered += int((fired.any(1) & planted).sum())
        n_planted += int(planted.sum())
        n += len(planted)
    return PlantedScore(
        float(on_planted.sum() / fired_total.sum().clamp(min=1)),
        covered / max(n_planted, 1),
        n_planted / n,
        on_planted / fired_total,
    )


class SplicedLoss(NamedTuple):
    ce_clean: float
    """Next-token loss of the unmodified model."""
    ce_spliced: float
    """... with its site activation replaced by the crosscoder's reconstruction."""
    ce_zero: float
    """... with its site activation replaced by zeros."""
    loss_recovered: float
    """(ce_zero − ce_spliced) / (ce_zero − ce_clean)."""
    kl: float
    """Mean KL(clean ‖ spliced) per token."""


@torch.no_grad()
def spliced_loss(
    raw_cc: CrossCoder, pair: ModelPair, store: ActivationStore, n_sequences: int = 64, seqs_per_batch: int = 16
) -> list[SplicedLoss]:
    """Per model, the loss when the crosscoder's reconstruction replaces the site activation, on held-out
    documents (those after the store's last document). ``raw_cc`` reads raw activations (``run_dir/raw``).

    Only the tokens the store kept are replaced (BOS and other exclusions stay clean, as in training)."""
    if "site" not in store.meta["settings"]:
        raise ValueError("spliced-in evaluation needs a store collected from models (not from_arrays)")
    cfg = CollectConfig.from_dict(store.meta["settings"])
    tokenizer = pair.tokenizer
    sequences = tokenize(load_texts(cfg.dataset, cfg.split, cfg.text_column, tokenizer), tokenizer, cfg.seq_len)
    first_unused = int(store.positions([len(store) - 1])[0]) + 1
    sequences = list(itertools.islice(sequences, first_unused, first_unused + n_sequences))
    if not sequences:
        raise ValueError("the store used every document of its dataset: no held-out documents remain")
    traced = TracedPair(pair, cfg.site, cfg.layer, "right")
    n_models = len(pair.models)
    totals = np.zeros((n_models, 4))  # ce clean, spliced, zero, kl (summed over predicted tokens)
    n_predicted = 0
    for start in tqdm(range(0, len(sequences), seqs_per_batch), desc="spliced-in loss"):
        ids, mask, pos = traced.pad(sequences[start : start + seqs_per_batch])
        clean = traced.activations(ids, mask, pos)  # [batch, seq, model, d]
        keep = keep_mask(ids, mask, pos, cfg, tokenizer.bos_token_id)[..., None, None]
        spliced = torch.where(keep, raw_cc(clean.float().flatten(0, 1)).view_as(clean).to(clean.dtype), clean)
        zeroed = torch.where(keep, torch.zeros_like(clean), clean)
        predicted = mask[:, 1:].bool()
        targets = ids[:, 1:][predicted]
        for m in range(n_models):
            logps = [
                F.log_softmax(traced.logits(m, ids, mask, pos, replacement)[:, :-1][predicted].float(), -1)
                for replacement in (None, spliced[:, :, m], zeroed[:, :, m])
            ]
            ce = [-lp.gather(1, targets[:, None]).sum().item() for lp in logps]
            kl = F.kl_div(logps[1], logps[0], log_target=True, reduction="sum").item()
            totals[m] += ce + [kl]
        n_predicted += int(predicted.sum())
    return [
        SplicedLoss(clean, spliced, zero, (zero - spliced) / (zero - clean), kl)
        for clean, spliced, zero, kl in totals / n_predicted
    ]
