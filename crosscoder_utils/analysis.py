"""Reading a trained crosscoder: what the fine-tune changed (the difference ranking and the kinds of latent),
where the models differ token by token, whether exclusive latents truly are (Latent Scaling), which latent
carries each planted behaviour, and how well the crosscoder stands in for each model. Numbers only: the
figures are in plots.py.

Everything is computed in normalised units (the space the crosscoder was trained in) on the store's
held-out ``val`` split unless said otherwise.
"""

from __future__ import annotations

import csv
import itertools
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import einsum

from .collect import TracedPair, check_inputs, keep_mask, load_texts, tokenize
from .config import CollectConfig, model_roles
from .crosscoder import CrossCoder
from .encoding import Encoded, encode
from .explanations import Explanations, PhraseGroup, explain, phrase_groups
from .health import Health, dictionary_health
from .models import ModelPair, load_model_pair
from .notebook import progress
from .organism import behaviour_labels, load_organism
from .store import ActivationStore
from .train import Run, load_run


@torch.no_grad()
def relative_decoder_norms(cc: CrossCoder) -> torch.Tensor:
    """[dict_size, n_models]: each model's share ‖d_m‖ / Σ_m' ‖d_m'‖ of a latent's decoder norm,
    in normalised units. For two models column 1 is the usual ‖d_ft‖ / (‖d_base‖ + ‖d_ft‖)."""
    norms = cc.decoder_norms()
    return norms / norms.sum(-1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def model_shares(cc: CrossCoder, encoded: Encoded | None = None) -> torch.Tensor:
    """[dict_size, n_models]: how much of each latent each model holds, summing to 1 over the models.

    Without data, the decoder-norm shares (``relative_decoder_norms``). With ``encoded`` (``encode``: the
    latents' sums over a split), a latent that fires is measured by Latent Scaling instead: each model's β^ε along the
    latent's largest decoder vector (``LatentScaling``), clamped at 0, over their sum. A decoder half can
    hold norm without holding the latent: it fits whatever else the model's activations hold where the
    latent fires, as BatchTopK's halves for features exclusive to the other model do (nothing pulls them to
    zero); Latent Scaling asks whether the model's activations hold the latent's own direction.

    Latent Scaling decides only where it applies: where one model holds at least 3/4 of the decoder norm (a
    latent with substantial decoders in two models, shared or changed, writes a different vector in each,
    and β along one of them says nothing about the other), and where it reproduces the latent in its own
    model: β^ε there at least 0.5 and every model's at most 2 (in the owner it is 1 plus the error's
    correlation with the latent). A weak latent whose own error outweighs it gets β of any size and sign,
    which made 5 % of relu's exclusive labels false on the medium ground truth (bench/RESULTS.md). Elsewhere,
    and for latents that never fire, the decoder norms decide."""
    shares = relative_decoder_norms(cc).cpu()
    if encoded is None:
        return shares
    share, owner = shares.max(-1)
    beta = _betas(cc, encoded, owner)["error"]  # [n_models, dict_size]
    own = beta.gather(0, owner[None]).squeeze(0)
    applies = (encoded.f_squared > 0) & (share >= 0.75) & (own >= 0.5) & (beta <= 2).all(0)
    beta = beta.T.clamp(min=0)
    return torch.where(applies[:, None], beta / beta.sum(-1, keepdim=True).clamp(min=1e-12), shares)


def latent_kinds(cc: CrossCoder, exclusive_share: float = 0.9, encoded: Encoded | None = None) -> torch.Tensor:
    """int64 [dict_size]: m where model m holds at least ``exclusive_share`` of the latent (``model_shares``:
    by Latent Scaling with ``encoded``, else by decoder norm), else -1 (shared). For two models: base-only
    when the fine-tune's share is ≤ 1 − share, fine-tuned-only when ≥ share."""
    share, owner = model_shares(cc, encoded).max(dim=-1)
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


def context(store: ActivationStore, tokenizer, row: int, width: int = 8) -> str:
    """The token at a store row in its sequence, ``width`` stored tokens either side, as text: a «b» c."""
    window = np.arange(max(0, row - width), min(len(store), row + width + 1))
    seq, _ = store.positions(window)
    window = window[(seq == seq[window == row]).numpy()]
    tokens = store.token_ids(window).tolist()
    return "".join(f"«{tokenizer.decode([t])}»" if r == row else tokenizer.decode([t]) for r, t in zip(window, tokens))


class LatentSamples(NamedTuple):
    """Each latent's top activations and a uniform sample of its other activations, from one pass."""

    top_values: torch.Tensor
    """[dict_size, n_top] largest activations, descending (0 where it fired fewer times)."""
    top_rows: torch.Tensor
    """[dict_size, n_top] their store rows (-1 where none)."""
    sample_values: torch.Tensor
    """[dict_size, n_sample] activations drawn uniformly from all its firings, ascending (0 where none)."""
    sample_rows: torch.Tensor
    """[dict_size, n_sample] their store rows (-1 where none)."""


def _first_per_latent(latents: torch.Tensor, key: torch.Tensor, n: int, n_latents: int):
    """(indices, positions): the first ``n`` entries of each latent by ascending ``key``, grouped by latent,
    and each one's position in its group."""
    order = key.argsort(stable=True)
    order = order[latents[order].argsort(stable=True)]
    counts = torch.bincount(latents, minlength=n_latents)
    position = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts)[latents[order]]
    keep = position < n
    return order[keep], position[keep]


def latent_samples(encoded: Encoded, n_top: int = 10, n_sample: int = 30, seed: int = 0) -> LatentSamples:
    """Each latent's ``n_top`` largest activations and ``n_sample`` firings drawn uniformly (random
    priorities, the smallest kept), with their store rows."""
    latents, values = encoded.latent, encoded.value
    rows = torch.from_numpy(encoded.rows)[encoded.token]
    priority = torch.rand(len(latents), generator=torch.Generator().manual_seed(seed))
    n_latents = encoded.dict_size

    def table(key: torch.Tensor, width: int, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n_latents, width] values and rows of the entries chosen by ``key``, each latent's laid out by ``order``."""
        chosen, _ = _first_per_latent(latents, key, width, n_latents)
        index, position = _first_per_latent(latents[chosen], order[chosen], width, n_latents)
        index = chosen[index]
        out_values, out_rows = torch.zeros(n_latents, width), torch.full((n_latents, width), -1)
        out_values[latents[index], position] = values[index]
        out_rows[latents[index], position] = rows[index]
        return out_values, out_rows

    return LatentSamples(*table(-values, n_top, -values), *table(priority, n_sample, values))


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
def _betas(cc: CrossCoder, encoded: Encoded, owners: torch.Tensor, latents: torch.Tensor | None = None) -> dict:
    """Target name -> [n_models, J] β of ``latents`` (None: every latent, reading the sums without a copy)
    along each one's decoder vector in model ``owners[j]``."""
    pick = (lambda t: t) if latents is None else (lambda t: t[latents])
    decoders = pick(cc.W_dec.detach().cpu()).double()  # [J, n_models, d]
    direction = decoders[torch.arange(len(owners)), owners.cpu()]
    own = einsum(direction, decoders, "j d, j m d -> m j")  # ⟨d, W_dec[j, m]⟩
    on_x = einsum(pick(encoded.f_x), direction, "j m d, j d -> m j")  # Σ_t f_j ⟨d, x_m⟩
    on_hat = einsum(pick(encoded.f_x_hat), direction, "j m d, j d -> m j")
    f_squared = pick(encoded.f_squared)
    contribution = f_squared * own  # Σ_t f_j ⟨d, f_j W_dec[j, m]⟩
    sums = {"activation": on_x, "reconstruction": on_hat - contribution, "error": on_x - on_hat + contribution}
    denominator = direction.pow(2).sum(-1) * f_squared
    return {name: (value / denominator).float() for name, value in sums.items()}


def latent_scaling(cc: CrossCoder, encoded: Encoded, latents, owner: int, other: int) -> LatentScaling:
    latents = torch.as_tensor(latents, dtype=torch.long)
    beta = _betas(cc, encoded, torch.full_like(latents, owner), latents)
    ratio = lambda name: beta[name][other] / beta[name][owner]
    return LatentScaling(latents, beta, ratio("error"), ratio("reconstruction"))


class Detection(NamedTuple):
    """Per group (a latent, a candidate direction), its best cut of "score above a threshold" against labelled
    tokens: the F1 and, at that cut, the precision, the recall and the lowest score kept."""

    f1: torch.Tensor
    precision: torch.Tensor
    recall: torch.Tensor
    threshold: torch.Tensor


def detection(group: torch.Tensor, score: torch.Tensor, hit: torch.Tensor, n_groups: int, n_labelled: int) -> Detection:
    """The best cut of each group's scores against the labels, [n_groups] each. The entries are the tokens each
    group scores (a latent's firings, or every token for a dense score): ``group``, ``score`` and ``hit``
    (whether the entry's token is labelled) [entries]; ``n_labelled`` counts the labelled tokens in all, so a
    token a group does not score counts as below every threshold. Cuts fall between distinct scores only
    (tied tokens are never split); a group with no entry gets F1 0."""
    if not len(group):
        return Detection(*[torch.zeros(n_groups)] * 4)
    order = score.argsort(descending=True, stable=True)
    order = order[group[order].argsort(stable=True)]
    group, score, hit = group[order], score[order], hit[order].double()
    counts = torch.bincount(group, minlength=n_groups)
    first = torch.cumsum(counts, 0) - counts  # each group's first entry
    total = hit.cumsum(0)
    hits = total - (total - hit)[first[group]]  # labelled tokens among the group's entries so far
    kept = torch.arange(1, len(group) + 1, dtype=torch.float64) - first[group]
    f1 = 2 * hits / (kept + n_labelled)
    cut = torch.ones_like(hit, dtype=torch.bool)
    cut[:-1] = (score[:-1] != score[1:]) | (group[:-1] != group[1:])
    f1 = torch.where(cut, f1, -1.0)
    best = torch.full((n_groups,), -1.0, dtype=torch.float64).scatter_reduce(0, group, f1, "amax")
    at = torch.full((n_groups,), len(group)).scatter_reduce(  # the first entry reaching each group's best
        0, group, torch.where(f1 == best[group], torch.arange(len(group)), len(group)), "amin"
    )
    found = at < len(group)
    pick = lambda values: torch.where(found, values[at.clamp(max=len(group) - 1)], 0.0).float()
    return Detection(pick(f1), pick(hits / kept), pick(hits / max(n_labelled, 1)), pick(score.double()))


class BehaviourMatch(NamedTuple):
    """The latent that best picks out one labelled behaviour (its activation above a threshold vs the label,
    on a split)."""

    latent: int
    precision: float
    """Of the tokens where the latent's activation reaches ``threshold``, the fraction on the behaviour's."""
    recall: float
    """Of the behaviour's tokens, the fraction where the latent's activation reaches ``threshold``."""
    f1: float
    threshold: float
    """The activation that separates the behaviour's tokens best (the lowest one kept)."""
    n_tokens: int
    """The behaviour's tokens in the split."""


def behaviour_hits(encoded: Encoded, labels: dict[str, torch.Tensor]):
    """For behaviours ``labels`` (name -> bool [len(store)]): firings of each latent on each behaviour's tokens
    [behaviours, dict_size], firings of each latent [dict_size], and each behaviour's token count."""
    on = torch.stack([labels[name][torch.from_numpy(encoded.rows)] for name in labels]).double()  # [behaviours, n]
    count = lambda weights=None: torch.bincount(encoded.latent, weights, minlength=encoded.dict_size).double()
    return torch.stack([count(label[encoded.token]) for label in on]), count(), on.sum(1)


def best_latents(encoded: Encoded, labels: dict[str, torch.Tensor]) -> dict[str, BehaviourMatch]:
    """For each behaviour (``labels``: name -> bool [len(store)]), the latent whose activation, above its best
    threshold (``detection``), has the best F1 against the behaviour's tokens: a latent that also fires weakly
    elsewhere still picks out the behaviour by its strong activations."""
    matches = {}
    for name, label in labels.items():
        on = label[torch.from_numpy(encoded.rows)]
        found = detection(encoded.latent, encoded.value, on[encoded.token], encoded.dict_size, int(on.sum()))
        latent = int(found.f1.argmax())
        f1, precision, recall, threshold = (float(values[latent]) for values in found)
        matches[name] = BehaviourMatch(latent, precision, recall, f1, threshold, int(on.sum()))
    return matches


def main_behaviours(encoded: Encoded, labels: dict[str, torch.Tensor], min_precision: float = 0.5) -> dict:
    """latent -> (behaviour, precision) for the latents that fire mostly (at least ``min_precision`` of their
    firings) on one behaviour's tokens."""
    hits, fired, _ = behaviour_hits(encoded, labels)
    precision = hits / fired.clamp(min=1)
    best, behaviour = precision.max(0)
    names = list(labels)
    return {i: (names[behaviour[i]], float(best[i])) for i in (best >= min_precision).nonzero().squeeze(1).tolist()}


KINDS = ("finetuned-only", "base-only", "changed", "shared", "dead")
"""The kinds of latent in a difference table (for a fine-tune other than the first, ``<role>-only``)."""


class DifferenceTable(NamedTuple):
    """Every latent compared between the base (model 0) and one fine-tune (``model``), on held-out tokens.
    Tensors are [dict_size]; ``order`` lists the live latents by ``difference_score``, highest first."""

    model: int
    """The fine-tune compared with the base."""
    kind: list[str]
    """finetuned-only, base-only, changed, shared or dead (see ``difference_table``)."""
    frequency: torch.Tensor
    """Fraction of held-out tokens on which the latent fires."""
    relative_norm: torch.Tensor
    """‖d_m‖ / (‖d_base‖ + ‖d_m‖), normalised units."""
    decoder_cosine: torch.Tensor
    """cosine(d_base, d_m)."""
    difference_score: torch.Tensor
    """How much the models differ where the latent fires: activation-weighted mean KL(model ‖ base), nats
    (see ``difference_table``)."""
    order: torch.Tensor
    """int64 [n_live]: the live latents, highest difference_score first."""

    def rank(self, latent: int) -> int | None:
        """1-based rank of a latent in the difference ranking (None for a dead latent)."""
        found = (self.order == latent).nonzero()
        return int(found[0, 0]) + 1 if len(found) else None


class TokenDivergence(NamedTuple):
    """Where the models differ, per held-out token (the store rows of a split)."""

    rows: np.ndarray
    """int64 [n] store rows."""
    kl: torch.Tensor
    """[n] KL(finetuned ‖ base) of the next-token distributions at each row, nats."""
    activation_difference: torch.Tensor
    """[n] ‖x_finetuned − x_base‖ at the site, normalised units."""


@torch.no_grad()
def token_divergence(
    pair: ModelPair,
    store: ActivationStore,
    factors: torch.Tensor,
    model: int = 1,
    split: str = "val",
    seqs_per_batch: int = 4,
    max_tokens: int | None = None,
) -> TokenDivergence:
    """KL(model ‖ base) of the next-token distributions, and the norm of the activation difference at the
    site, on every stored token of a split (its first ``max_tokens``, as ``encode`` reads them):
    the baseline view of where two models differ, which also checks the crosscoder against the models
    themselves. The split's documents are tokenised again from the store's dataset and run through both
    models, ``seqs_per_batch`` at a time (at Gemma-2-2B's 256k vocabulary and 1024-token documents, the
    float32 distributions of 4 take 29 GiB of GPU memory, of 16 88 GiB, for the same speed)."""
    if "site" not in store.meta["settings"]:
        raise ValueError("per-token divergence needs a store collected from models (not from_arrays)")
    cfg = CollectConfig.from_dict(store.meta["settings"])
    span = store.split_range(split)
    rows = np.arange(span.start, span.stop if max_tokens is None else min(span.stop, span.start + max_tokens))
    seq, pos = (t.numpy() for t in store.positions(rows))
    first, last = int(seq.min()), int(seq.max())
    tokenizer = pair.tokenizer
    texts = load_texts(cfg.dataset, cfg.split, cfg.text_column, tokenizer)
    sequences = list(itertools.islice(tokenize(texts, tokenizer, cfg.seq_len), first, last + 1))
    traced = TracedPair(pair, cfg.site, cfg.layer, "right")
    kl = torch.zeros(len(rows))
    for start in progress(range(0, len(sequences), seqs_per_batch), desc="per-token KL"):
        ids, mask, positions = traced.pad(sequences[start : start + seqs_per_batch])
        logps = [F.log_softmax(traced.logits(m, ids, mask, positions).float(), -1) for m in (0, model)]
        per_token = (logps[1].exp() * (logps[1] - logps[0])).sum(-1).cpu()  # [batch, seq]
        in_batch = (seq >= first + start) & (seq < first + start + seqs_per_batch)
        kl[in_batch] = per_token[seq[in_batch] - first - start, pos[in_batch]]
    x = store.read(rows) * factors[None, :, None]
    return TokenDivergence(rows, kl, (x[:, model] - x[:, 0]).norm(dim=-1))


def difference_scores(encoded: Encoded, difference: torch.Tensor) -> torch.Tensor:
    """[dict_size] each latent's mean of ``difference`` ([n] per encoded token) over the tokens where it fires,
    weighted by its activation (0 for a latent that never fires)."""
    weights = encoded.value.double()
    count = lambda w: torch.bincount(encoded.latent, w, minlength=encoded.dict_size)
    return (count(weights * difference[encoded.token].double()) / count(weights).clamp(min=1e-12)).float()


def ranking(encoded: Encoded, score: torch.Tensor) -> torch.Tensor:
    """int64 [n_live]: the latents that fire on the encoded tokens, highest ``score`` ([dict_size]) first."""
    live = (encoded.frequency > 0).nonzero().squeeze(1)
    return live[score[live].argsort(descending=True)]


@torch.no_grad()
def difference_table(
    cc: CrossCoder,
    encoded: Encoded,
    divergence: TokenDivergence | None = None,
    model: int = 1,
    exclusive_share: float = 0.9,
    changed_cosine: float = 0.5,
) -> DifferenceTable:
    """Every latent compared between the base and fine-tune ``model`` on held-out tokens: its kind, and how
    much it carries the difference between the models.

    difference_score: the mean, over the tokens where the latent fires and weighted by its activation, of
    how much the models differ there: KL(model ‖ base) of their next-token distributions (``divergence``),
    or without one (a store not collected from models) ‖x_m − x_base‖² at the site. Measured on the
    organism and on a pair with one changed token (bench/bench_difference_ranking.py), this put the
    planted latents above every other score tried; scores read off the decoders alone (cosine, decoder
    change, the part of the activation difference a latent writes) favour frequent latents that absorbed
    small, unplanted drift, and carry nothing for BatchTopK, whose decoder cosines are low throughout.

    Kinds: ``dead`` never fires on the tokens; ``<role>-only`` holds at least ``exclusive_share`` of the
    latent by Latent Scaling (``model_shares``; base-only: at most 1 − share); ``changed`` present in both
    models but with decoder cosine below ``changed_cosine`` (the fine-tune changed what the latent writes);
    ``shared`` otherwise."""
    norms = cc.decoder_norms()
    relative = norms[:, model] / (norms[:, 0] + norms[:, model]).clamp(min=1e-12)
    shares = model_shares(cc, encoded)
    held = shares[:, model] / (shares[:, 0] + shares[:, model]).clamp(min=1e-12)  # the fine-tune's, of the two
    cosine = decoder_cosines(cc, 0, model)
    if divergence is None:
        difference = encoded.squared_difference[:, model]
    elif np.array_equal(divergence.rows, encoded.rows):
        difference = divergence.kl
    else:
        raise ValueError("the divergence and the encoding cover different rows: compute both with the same max_tokens")
    score = difference_scores(encoded, difference)
    frequency = encoded.frequency
    role = model_roles(cc.cfg.n_models)[model]
    kind = []
    for i in range(cc.cfg.dict_size):
        if frequency[i] == 0:
            kind.append("dead")
        elif held[i] >= exclusive_share:
            kind.append(f"{role}-only")
        elif held[i] <= 1 - exclusive_share:
            kind.append("base-only")
        elif cosine[i] < changed_cosine:
            kind.append("changed")
        else:
            kind.append("shared")
    return DifferenceTable(model, kind, frequency, relative, cosine, score, ranking(encoded, score))


@torch.no_grad()
def difference_explained(
    cc: CrossCoder, encoded: Encoded, store: ActivationStore, factors: torch.Tensor, latents, rows, model: int = 1
) -> float:
    """Fraction of the activation difference x_m − x_base (summed squares over store ``rows``, among those
    encoded) that the crosscoder reconstructs from ``latents`` alone: 1 − Σ‖Δx − Δx̂‖² / Σ‖Δx‖², where
    Δx̂ = Δb_dec + Σ_{i ∈ latents} f_i (d_m,i − d_base,i)."""
    rows = np.sort(np.asarray(rows))
    positions = np.searchsorted(encoded.rows, rows)
    if not np.array_equal(encoded.rows[positions.clip(max=encoded.n_tokens - 1)], rows):
        raise ValueError("difference_explained: some rows were not encoded")
    latents = torch.as_tensor(latents, dtype=torch.long)
    delta = (cc.W_dec[latents, model] - cc.W_dec[latents, 0]).detach()
    bias = (cc.b_dec[model] - cc.b_dec[0]).detach()
    residual = total = 0.0
    for start in range(0, len(rows), 4096):
        x = store.read(rows[start : start + 4096]) * factors[None, :, None]
        difference = x[:, model] - x[:, 0]
        predicted = bias + encoded.activations(latents, positions[start : start + 4096]) @ delta
        residual += float((difference - predicted).pow(2).sum())
        total += float(difference.pow(2).sum())
    return 1 - residual / max(total, 1e-12)


def exclusive_latent_scaling(cc: CrossCoder, encoded: Encoded, table: DifferenceTable) -> dict[str, LatentScaling]:
    """Latent Scaling of the table's live exclusive latents, by kind (``<role>-only`` and ``base-only``)."""
    role = model_roles(cc.cfg.n_models)[table.model]
    scalings = {}
    for kind, owner, other in ((f"{role}-only", table.model, 0), ("base-only", 0, table.model)):
        latents = [i for i, k in enumerate(table.kind) if k == kind]
        if latents:
            scalings[kind] = latent_scaling(cc, encoded, latents, owner, other)
    return scalings


def genuine(scaling: LatentScaling, nu_threshold: float) -> torch.Tensor:
    """bool [J]: latents whose |ν^ε| and |ν^r| are both below ``nu_threshold`` (genuinely exclusive)."""
    return (scaling.nu_error.abs() < nu_threshold) & (scaling.nu_reconstruction.abs() < nu_threshold)


def write_latents_csv(
    table: DifferenceTable, scalings: dict[str, LatentScaling], explanations: Explanations, path: str | Path
) -> None:
    """The live latents by difference_score, then the dead ones: latent, kind, frequency, relative_norm,
    decoder_cosine, difference_score, nu_error, nu_reconstruction (ν empty where not exclusive), explanation,
    explanation_f1 (its detection F1; empty for a dead latent)."""
    nu = {}
    for scaling in scalings.values():
        for latent, error, reconstruction in zip(
            scaling.latents.tolist(), scaling.nu_error.tolist(), scaling.nu_reconstruction.tolist()
        ):
            nu[latent] = (f"{error:.4g}", f"{reconstruction:.4g}")
    dead = [i for i, kind in enumerate(table.kind) if kind == "dead"]
    columns = ["latent", "kind", "frequency", "relative_norm", "decoder_cosine", "difference_score"]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns + ["nu_error", "nu_reconstruction", "explanation", "explanation_f1"])
        for i in table.order.tolist() + dead:
            values = (table.frequency[i], table.relative_norm[i], table.decoder_cosine[i], table.difference_score[i])
            f1 = "" if table.kind[i] == "dead" else f"{float(explanations.f1[i]):.3f}"
            writer.writerow(
                [i, table.kind[i], *(f"{float(v):.6g}" for v in values), *nu.get(i, ("", "")), explanations.text[i], f1]
            )


class Finding(NamedTuple):
    """One latent of the difference ranking, as the verdict shows it."""

    rank: int
    latent: int
    kind: str
    frequency: float
    difference_score: float
    contexts: list[str]
    """Its top-activating held-out contexts, the token in «»."""
    fires_on: str
    """On the organism: the planted behaviour it fires mostly on (with its precision, and its F1 when it is
    that behaviour's best latent), else empty."""
    twins: list[int]
    """The ranks of lower-ranked latents that duplicate it (``distinct_top``), left out of the top."""
    explanation: str
    """Its rule of where it fires, with its detection F1 (``explanations.explain``)."""


class TopLatents(NamedTuple):
    """The top of a difference ranking, one latent per firing pattern (``distinct_top``)."""

    latents: list[int]
    """The highest-ranked latents that fire on nearly the same tokens as no higher-ranked one kept."""
    twins: list[list[int]]
    """For each, the lower-ranked latents that do (left out of the top)."""


def distinct_top(order: torch.Tensor, n: int, groups: list[list[int]]) -> TopLatents:
    """The first ``n`` latents of ``order`` (a ranking) from different duplicate ``groups``
    (``Health.groups``: latents that fire on nearly the same tokens or write nearly the same vector), each with
    the rest of its group that the ranking holds (its twins, by rank), so the top shows ``n`` different things
    the crosscoder found rather than one learnt several times."""
    rank = {latent: position for position, latent in enumerate(order.tolist())}
    group_of = {latent: group for group in groups for latent in group}
    top = TopLatents([], [])
    for latent in order.tolist():
        if len(top.latents) == n:
            break
        group = group_of.get(latent, [latent])
        if min(group, key=lambda other: rank.get(other, len(rank))) == latent:
            top.latents.append(latent)
            top.twins.append(sorted((other for other in group if other != latent and other in rank), key=rank.get))
    return top


def findings(
    table: DifferenceTable,
    samples: LatentSamples,
    n_contexts: int,
    store: ActivationStore,
    tokenizer,
    top: TopLatents,
    explanations: Explanations,
    matches: dict[str, BehaviourMatch] | None = None,
    mains: dict | None = None,
) -> list[Finding]:
    """The ``top`` latents of the ranking (``distinct_top``) with their ``n_contexts`` top contexts (from
    ``samples``), their twins and, on the organism (``matches`` from best_latents, ``mains`` from
    main_behaviours), the planted behaviour each fires on."""
    best_of = {match.latent: (name, match.f1) for name, match in (matches or {}).items()}
    result = []
    for latent, twins in zip(top.latents, top.twins):
        rows = [row for row in samples.top_rows[latent, :n_contexts].tolist() if row >= 0]
        fires_on = ""
        if latent in (mains or {}):
            behaviour, precision = mains[latent]
            fires_on = f"{behaviour} (precision {precision:.2f})"
        if latent in best_of:
            fires_on = f"{best_of[latent][0]} (best latent, F1 {best_of[latent][1]:.2f})"
        result.append(
            Finding(
                table.rank(latent),
                latent,
                table.kind[latent],
                float(table.frequency[latent]),
                float(table.difference_score[latent]),
                [context(store, tokenizer, row) for row in rows],
                fires_on,
                [table.rank(twin) for twin in twins],
                f"{explanations.text[latent]} (F1 {float(explanations.f1[latent]):.2f})",
            )
        )
    return result


EXPECTED_KINDS = {"added": ("finetuned-only", "changed"), "removed": ("base-only", "changed"), "changed": ("changed",)}
"""Planted kind (planted.json) -> the kinds of latent that carry it as planted: what the fine-tune added is in
the fine-tune alone or written differently there, what it removed is in the base alone or written
differently, and what it changed is written differently."""


class Answer(NamedTuple):
    """What changed, read off one difference table (``answer``)."""

    top: TopLatents
    """The top of the ranking, one latent per duplicate group."""
    groups: list[PhraseGroup]
    """The top's latents grouped by the phrase or context they fire in, by rank."""
    base_groups: list[PhraseGroup]
    """The same for the top of the ranking among the latents the base writes more (relative norm < 0.5):
    what the fine-tune no longer does."""


def answer(analysis: Analysis, table: DifferenceTable, n_top: int) -> Answer:
    """The top ``n_top`` latents of ``table``'s ranking and the phrases they fire in, for the fine-tune and
    for the base side."""
    top = distinct_top(table.order, n_top, analysis.health.groups)
    base_order = table.order[table.relative_norm[table.order] < 0.5]
    base_top = distinct_top(base_order, n_top, analysis.health.groups)
    tokenizer = analysis.pair.tokenizer if analysis.pair else None
    encoded, store, explanations = analysis.encoded, analysis.run.store, analysis.explanations
    return Answer(
        top,
        phrase_groups(encoded, store, top.latents, explanations, tokenizer),
        phrase_groups(encoded, store, base_top.latents, explanations, tokenizer),
    )


def describe_groups(table: DifferenceTable, groups: list[PhraseGroup], n: int) -> str:
    """«phrase» (latents a, b: k of the top n, KL up to x nats); then ..."""
    return "; then ".join(
        f"{group.phrase} (latent{'s' * (len(group.latents) > 1)} {', '.join(map(str, group.latents))}:"
        f" {len(group.latents)} of the top {n}, KL up to"
        f" {max(float(table.difference_score[i]) for i in group.latents):.1f} nats)"
        for group in groups
    )


def verdict(
    table: DifferenceTable,
    answered: Answer,
    matches: dict[str, BehaviourMatch] | None = None,
    mains: dict | None = None,
    min_f1: float = 0.8,
    planted_kinds: dict[str, str] | None = None,
) -> str:
    """What the ranking found: the phrases its top latents fire in (``answer``), for the fine-tune and the base
    side; whether the top latents are shared (one representation both models hold, acted on differently);
    the kinds among them, how many twins were left out and, on the organism, how many of the top fire mostly
    on planted tokens, where each planted behaviour's best latent ranks and its kind (a behaviour counts as
    found when its best latent reaches ``min_f1`` and is in the top or a twin of one there), and, with
    ``planted_kinds`` (behaviour -> added, removed or changed), how many best latents have a kind of
    ``EXPECTED_KINDS``."""
    top = answered.top
    n = len(top.latents)
    sentence = f"The fine-tune's predictions differ most inside {describe_groups(table, answered.groups, n)}."
    if answered.base_groups:
        n_base = sum(len(group.latents) for group in answered.base_groups)
        sentence += (
            " On the base side (latents the base writes more), inside"
            f" {describe_groups(table, answered.base_groups, n_base)}."
        )
    shared = [i for i in top.latents if table.kind[i] == "shared"]
    if 2 * len(shared) >= n:
        cosines = table.decoder_cosine[shared]
        sentence += (
            f" {len(shared)} of the top {n} are shared: both models hold these representations (decoder cosine"
            f" {float(cosines.min()):.2f}-{float(cosines.max()):.2f}, median {float(cosines.median()):.2f}), and the"
            " fine-tune acts on them differently."
        )
    kinds = ", ".join(f"{count} {kind}" for kind, count in Counter(table.kind[i] for i in top.latents).most_common())
    sentence += f" The top {n} latents of the ranking are {kinds}"
    n_twins = sum(map(len, top.twins))
    if n_twins:
        sentence += f" ({n_twins} lower-ranked latents that duplicate one of them left out)"
    if matches is None:
        return sentence + "."
    on_planted = Counter(mains[i][0] for i in top.latents if i in mains)
    sentence += (
        f"; {sum(on_planted.values())} of them fire mostly on planted tokens"
        + (f" ({', '.join(f'{name} {count}' for name, count in on_planted.most_common())})" if on_planted else "")
        + ". Best latent of each planted behaviour (F1, rank, kind): "
        + ", ".join(
            f"{name} {m.f1:.2f} #{table.rank(m.latent) or '-'} {table.kind[m.latent]}" for name, m in matches.items()
        )
    )
    shown = set(top.latents).union(*top.twins)
    found = [name for name, m in matches.items() if m.f1 >= min_f1 and m.latent in shown]
    sentence += f"; {len(found)} of {len(matches)} found in the top {n} with F1 ≥ {min_f1}"
    if planted_kinds:
        expected = [name for name, m in matches.items() if table.kind[m.latent] in EXPECTED_KINDS[planted_kinds[name]]]
        rule = ", ".join(f"{planted}: {' or '.join(kinds)}" for planted, kinds in EXPECTED_KINDS.items())
        sentence += f"; {len(expected)} of {len(matches)} of the kind their planting implies ({rule})"
    return sentence + "."


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
    raw_cc: CrossCoder, pair: ModelPair, store: ActivationStore, n_sequences: int = 64, seqs_per_batch: int = 4
) -> list[SplicedLoss]:
    """Per model, the loss when the crosscoder's reconstruction replaces the site activation, on held-out
    documents: those after the store's last document, or when the dataset ran out, the store's val documents.
    ``raw_cc`` reads raw activations (``run_dir/raw``).

    Only the tokens the store kept are replaced (BOS and other exclusions stay clean, as in training)."""
    if "site" not in store.meta["settings"]:
        raise ValueError("spliced-in evaluation needs a store collected from models (not from_arrays)")
    cfg = CollectConfig.from_dict(store.meta["settings"])
    tokenizer = pair.tokenizer
    documents = lambda first: list(
        itertools.islice(
            tokenize(load_texts(cfg.dataset, cfg.split, cfg.text_column, tokenizer), tokenizer, cfg.seq_len),
            first,
            first + n_sequences,
        )
    )
    sequences = documents(int(store.positions([len(store) - 1])[0]) + 1)
    val = store.split_range("val")
    if not sequences and len(val):  # the store used every document: its val documents were never trained on
        sequences = documents(int(store.positions([val.start])[0]))
    if not sequences:
        raise ValueError("no held-out documents: the store used every document of its dataset and has no val split")
    traced = TracedPair(pair, cfg.site, cfg.layer, "right")
    n_models = len(pair.models)
    totals = np.zeros((n_models, 4))  # ce clean, spliced, zero, kl (summed over predicted tokens)
    n_predicted = 0
    for start in progress(range(0, len(sequences), seqs_per_batch), desc="spliced-in loss"):
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


class Analysis(NamedTuple):
    """What 04 and the dashboard read off a run, from one encoding pass over its held-out split."""

    run_dir: Path
    run: Run
    encoded: Encoded
    pair: ModelPair | None
    """The models, for a store collected from them (else None)."""
    divergence: TokenDivergence | None
    """Per-token KL between the base and the first fine-tune (None without models)."""
    tables: dict[str, DifferenceTable]
    """Each fine-tune's role -> its difference table against the base."""
    matches: dict[str, BehaviourMatch] | None
    """On the organism: each planted behaviour's best latent (against the first fine-tune), else None."""
    mains: dict | None
    """On the organism: the latents that fire mostly on one planted behaviour (``main_behaviours``)."""
    planted_kinds: dict | None
    """On the organism: each planted behaviour's kind (added, removed, changed), else None."""
    health: Health
    """The dictionary's dead latents and duplicate groups on the held-out tokens read."""
    explanations: Explanations
    """Each latent's rule of where it fires, with its detection F1 (``explanations.explain``)."""


def analyse(
    run_dir: str | Path,
    organism_dir: str | Path | None = None,
    exclusive_share: float = 0.9,
    changed_cosine: float = 0.5,
    device: str = "auto",
    tokens_per_batch: int = 4096,
    max_tokens: int | None = None,
) -> Analysis:
    """Read a finished run: encode its store's held-out split once (its first ``max_tokens`` tokens) on
    ``device``, and, for a store collected from models, load them (checked to be those the store came
    from) for the per-token KL; then each fine-tune's difference table and, with ``organism_dir``, the
    planted behaviours' latents."""
    run = load_run(run_dir)
    store = run.store
    pair = load_model_pair(*store.meta["models"], device=device) if store.meta["site"] else None
    if pair:
        check_inputs(store, pair)  # the models and data are still those the store was collected from
    divergence = token_divergence(pair, store, run.norm_factors, max_tokens=max_tokens) if pair else None
    encoded = encode(run.crosscoder, store, run.norm_factors, "val", tokens_per_batch, max_tokens, device)
    roles = model_roles(store.n_models)
    tables = {
        roles[m]: difference_table(
            run.crosscoder, encoded, divergence if m == 1 else None, m, exclusive_share, changed_cosine
        )
        for m in range(1, store.n_models)
    }
    matches = mains = planted_kinds = None
    if organism_dir:
        organism = load_organism(organism_dir)
        labels = behaviour_labels(store, organism)
        matches, mains = best_latents(encoded, labels), main_behaviours(encoded, labels)
        planted_kinds = {name: behaviour["kind"] for name, behaviour in organism.planted["behaviours"].items()}
    health = dictionary_health(run.crosscoder, encoded)
    explanations = explain(encoded, store, pair.tokenizer if pair else None)
    return Analysis(
        Path(run_dir), run, encoded, pair, divergence, tables, matches, mains, planted_kinds, health, explanations
    )
