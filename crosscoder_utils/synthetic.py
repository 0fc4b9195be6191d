"""Ground-truth paired activations from a known sparse dictionary, and scoring a crosscoder against it.

Each true feature has a decoder vector per model (zero for the models it is absent from) and a kind:
-1 for shared, m for exclusive to model m. Activations are x_m = scale_m · Σ_i a_i · dec[i, m] + noise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .analysis import kind_name, latent_kinds
from .analysis.encoding import Encoded
from .config import EXCLUSIVE_SHARE, ConfigBase, CrossCoderConfig, TrainConfig, check_range
from .crosscoder import CrossCoder
from .files import read_json, write_json


@dataclass
class SyntheticConfig(ConfigBase):
    """The ground truth's knobs. Defaults are the hard, realistic setting: ~1000 features in 128
    dimensions, 40 % of them exclusive, Zipf-like rates, rotated and re-scaled shared features, exclusive
    features hiding behind a shared parent, and a fine-tune 4x larger than the base."""

    d_model: int = 128
    """Activation width per model."""
    n_models: int = 2
    """Number of models (model 0 the base)."""
    n_shared: int = 600
    """Features present in every model."""
    n_exclusive: int = 200
    """Features exclusive to each model (this many per model)."""
    max_rate: float = 0.03
    """Firing probability of the most frequent feature."""
    min_rate: float = 0.0005
    """Firing probability of the rarest feature (rates fall log-uniformly, i.e. Zipf-like, in between)."""
    shared_cosine: float = 0.8
    """Cosine between a shared feature's direction in model 0 and in each other model."""
    gain_change_frac: float = 0.2
    """Fraction of shared features whose gain in the other models is ×0.5 or ×2 (still shared)."""
    parent_frac: float = 0.5
    """Fraction of exclusive features that have a shared parent feature (the latent-decoupling trap)."""
    parent_cofire: float = 0.9
    """P(parent fires | child fires) for an exclusive feature with a parent."""
    model_scales: tuple = (1.0, 4.0)
    """Overall scale of each model's activations (the fine-tune several × larger)."""
    noise: float = 0.01
    """Standard deviation of Gaussian noise per dimension, relative to the mean activation norm / sqrt(d)."""
    n_tokens: int = 1_500_000
    """Rows to generate."""
    seed: int = 0
    """Seed of the dictionary and of the activations."""

    def __post_init__(self):
        self.check_types()
        check_range("d_model", self.d_model, above=0)
        check_range("n_models", self.n_models, at_least=2)
        check_range("n_shared", self.n_shared, above=0)  # parents (parent_frac) are drawn from the shared features
        check_range("n_exclusive", self.n_exclusive, at_least=0)
        for name in ("max_rate", "min_rate"):
            check_range(name, getattr(self, name), above=0, at_most=1)
        if self.min_rate > self.max_rate:
            raise ValueError(f"min_rate ({self.min_rate}) must be <= max_rate ({self.max_rate})")
        check_range("shared_cosine", self.shared_cosine, at_least=-1, at_most=1)
        for name in ("gain_change_frac", "parent_frac", "parent_cofire"):
            check_range(name, getattr(self, name), at_least=0, at_most=1)
        if len(self.model_scales) != self.n_models:
            raise ValueError(
                f"model_scales {self.model_scales} must have one entry per model (n_models={self.n_models})"
            )
        for scale in self.model_scales:
            check_range("each of model_scales", scale, above=0)
        check_range("noise", self.noise, at_least=0)
        check_range("n_tokens", self.n_tokens, above=0)
        check_range("seed", self.seed, at_least=0)


class GroundTruth(NamedTuple):
    decoders: torch.Tensor
    """[n_features, n_models, d_model] in raw units (scale and gain included)."""
    kinds: torch.Tensor
    """int64 [n_features]: -1 shared, m exclusive to model m."""
    rates: torch.Tensor
    """[n_features] firing probabilities."""
    parents: torch.Tensor
    """int64 [n_features]: the shared parent of an exclusive feature, -1 for none."""


class Synthetic(NamedTuple):
    activations: torch.Tensor
    """float32 [n_tokens, n_models, d_model]."""
    truth: GroundTruth
    codes: torch.Tensor
    """Sparse CSR [n_tokens, n_features]: each feature's activation on each token."""


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def dictionary(cfg: SyntheticConfig, g: torch.Generator) -> GroundTruth:
    n_models, d = cfg.n_models, cfg.d_model
    kinds = torch.tensor([-1] * cfg.n_shared + [m for m in range(n_models) for _ in range(cfg.n_exclusive)])
    n = len(kinds)
    base_dirs = _unit(torch.randn(n, d, generator=g))
    decoders = torch.zeros(n, n_models, d)
    for m in range(n_models):
        orthogonal = _unit(torch.randn(n, d, generator=g))
        orthogonal = _unit(orthogonal - (orthogonal * base_dirs).sum(-1, keepdim=True) * base_dirs)
        cos = 1.0 if m == 0 else cfg.shared_cosine
        decoders[:, m] = cos * base_dirs + (1 - cos**2) ** 0.5 * orthogonal
    gains = torch.ones(n, n_models)
    changed = (torch.rand(n, generator=g) < cfg.gain_change_frac) & (kinds == -1)
    gains[changed, 1:] = torch.where(torch.rand(int(changed.sum()), 1, generator=g) < 0.5, 0.5, 2.0)
    present = (kinds[:, None] == -1) | (kinds[:, None] == torch.arange(n_models))
    decoders = decoders * gains[..., None] * present[..., None] * torch.tensor(cfg.model_scales)[None, :, None]
    order = torch.randperm(n, generator=g)  # which features are frequent is independent of their kind
    rates = torch.exp(torch.linspace(np.log(cfg.max_rate), np.log(cfg.min_rate), n))[order.argsort()]
    parents = torch.full((n,), -1)
    for child in (kinds >= 0).nonzero().squeeze(1).tolist():
        if torch.rand(1, generator=g) < cfg.parent_frac:
            candidates = ((kinds == -1) & (rates >= rates[child])).nonzero().squeeze(1)
            parents[child] = (
                candidates[torch.randint(len(candidates), (1,), generator=g)]
                if len(candidates)
                else rates[: cfg.n_shared].argmax()
            )
    return GroundTruth(decoders, kinds, rates, parents)


def _firings(size: int, rates: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, column) of every firing when column j fires on each of ``size`` tokens independently with
    probability rates[j]: the gaps between firings are geometric, so the draws cost the firings (about 1 % of
    size × columns here), not one uniform draw per entry."""
    top = float(rates.max()) if len(rates) else 0.0
    per_column = int(size * top + 6 * (size * top) ** 0.5) + 16  # gaps to draw, doubled if short
    log_silent = torch.log1p(-rates.double()).clamp(max=-1e-300)[:, None]  # a zero rate: gaps past the end
    while True:
        uniform = 1 - torch.rand(len(rates), per_column, generator=g, dtype=torch.float64)  # in (0, 1]
        gaps = (uniform.log() / log_silent).floor().clamp(max=size).long() + 1
        positions = gaps.cumsum(1) - 1
        if (positions[:, -1] >= size).all():
            break
        per_column *= 2
    column, slot = (positions < size).nonzero(as_tuple=True)
    return positions[column, slot], column


def generate(cfg: SyntheticConfig, chunk: int = 65536) -> Synthetic:
    """Activations x_m = Σ_i a_i · decoders[i, m] + noise, with a_i ~ Exponential(1) when feature i fires."""
    g = torch.Generator().manual_seed(cfg.seed)
    truth = dictionary(cfg, g)
    n_features = len(truth.kinds)
    children = (truth.parents >= 0).nonzero().squeeze(1)
    parents = truth.parents[children]
    independent = (truth.parents < 0).nonzero().squeeze(1)
    independent_rates = truth.rates[independent]
    # a child fires with its parent (probability chosen so P(parent | child) = parent_cofire), or rarely alone
    with_parent = (cfg.parent_cofire * truth.rates[children] / truth.rates[parents]).clamp(max=1)
    alone = (1 - cfg.parent_cofire) * truth.rates[children]
    decoders = truth.decoders.flatten(1)
    xs, codes = [], []
    for start in range(0, cfg.n_tokens, chunk):
        size = min(chunk, cfg.n_tokens - start)
        fires = torch.zeros(size, n_features, dtype=torch.bool)
        token, column = _firings(size, independent_rates, g)
        fires[token, independent[column]] = True
        token, j = fires[:, parents].nonzero(as_tuple=True)  # the parents' firings: the child joins some
        keep = torch.rand(len(token), generator=g) < with_parent[j]
        fires[token[keep], children[j[keep]]] = True
        token, j = _firings(size, alone, g)  # the child alone, where its parent is silent
        keep = ~fires[token, parents[j]]
        fires[token[keep], children[j[keep]]] = True
        token, feature = fires.nonzero(as_tuple=True)
        magnitude = torch.empty(len(token)).exponential_(generator=g)
        code = torch.sparse_coo_tensor(
            torch.stack([token, feature]), magnitude, (size, n_features), check_invariants=False, is_coalesced=True
        )  # nonzero's indices: valid, sorted and distinct
        xs.append(torch.sparse.mm(code, decoders).view(size, *truth.decoders.shape[1:]))
        codes.append(code)
    x = torch.cat(xs)
    x += cfg.noise * x.norm(dim=-1).mean(0)[None, :, None] / cfg.d_model**0.5 * torch.randn(x.shape, generator=g)
    return Synthetic(x.float(), truth, torch.cat(codes).to_sparse_csr())


class Recovery(NamedTuple):
    recovered: dict
    """kind name (shared, base-only, finetuned-only) -> fraction of its true features with a latent of max
    cosine >= threshold."""
    classified: dict
    """kind name -> fraction also labelled with the right kind (``latent_kinds``: by Latent Scaling when
    ``score`` is given the encoded latents, else by decoder norm)."""
    false_exclusive_rate: float
    """Of the latents labelled exclusive (and matching a true feature), the fraction whose feature is shared."""
    latent_feature: torch.Tensor
    """int64 [dict_size]: each latent's best-matching true feature, -1 where the cosine is below threshold."""


@torch.no_grad()
def score(
    cc: CrossCoder,
    truth: GroundTruth,
    norm_factors: torch.Tensor,
    cos_threshold: float = 0.9,
    exclusive_share: float = EXCLUSIVE_SHARE,
    encoded: Encoded | None = None,
) -> Recovery:
    """Recovery and classification of the true features by a crosscoder trained in normalised units.

    Cosines compare decoder vectors with all models concatenated, both in normalised units. Latents are
    labelled as 04 labels them (``latent_kinds``): by Latent Scaling on ``encoded`` (the crosscoder's latents
    on the store), by decoder norm without it."""
    learnt = (cc.W_dec * cc.norm_factors[None, :, None]).flatten(1)
    true = (truth.decoders * norm_factors[None, :, None]).flatten(1)
    cosine = _unit(true) @ _unit(learnt).T
    best_cos, best_latent = cosine.max(dim=1)
    labels = latent_kinds(cc, exclusive_share, encoded)
    recovered, classified = {}, {}
    for kind in truth.kinds.unique().tolist():
        of_kind = truth.kinds == kind
        hit = best_cos[of_kind] >= cos_threshold
        name = kind_name(kind, truth.decoders.shape[1])
        recovered[name] = hit.float().mean().item()
        classified[name] = (hit & (labels[best_latent[of_kind]] == kind)).float().mean().item()
    latent_cos, latent_feature = cosine.max(dim=0)
    latent_feature = torch.where(latent_cos >= cos_threshold, latent_feature, -1)
    labelled_exclusive = (labels >= 0) & (latent_feature >= 0)
    false = labelled_exclusive & (truth.kinds[latent_feature] == -1)
    rate = false.sum().item() / max(labelled_exclusive.sum().item(), 1)
    return Recovery(recovered, classified, rate, latent_feature)


PLAIN = dict(lr=1e-3, lr_decay_frac=0.0, l1_warmup_frac=0.0, init="random", k_anneal_factor=1.0)
"""The recipe a new user starts from: A1-style random init, a constant learning rate, no λ warm-up, no k
annealing."""

CLASSIC = dict(variant="batchtopk", k=8, norm_penalty=0.0)
"""BatchTopK as published: no decoder-norm penalty (and, in the presets, no k annealing)."""

PRESETS = {  # name: (TrainConfig fields, CrossCoderConfig fields), over GROUND_TRUTH_BASE and the library defaults
    "relu_plain": (PLAIN, dict(variant="relu")),
    "relu": ({}, dict(variant="relu")),
    "relu_resampling": (dict(resample_every=250), dict(variant="relu")),
    "relu_random_init": (dict(init="random"), dict(variant="relu")),
    "relu_designated_shared": ({}, dict(variant="relu", n_shared_latents=100)),
    "relu_dedicated": ({}, dict(variant="relu", n_dedicated=200)),
    "batchtopk_plain": (PLAIN, CLASSIC),
    "batchtopk_classic": (dict(k_anneal_factor=1.0), CLASSIC),
    "batchtopk": ({}, dict(variant="batchtopk", k=8)),
    "batchtopk_resampling": (dict(resample_every=250), dict(variant="batchtopk", k=8)),
    "batchtopk_random_init": (dict(init="random"), dict(variant="batchtopk", k=8)),
    "batchtopk_designated_shared": ({}, dict(variant="batchtopk", k=8, n_shared_latents=100)),
    "batchtopk_dedicated": ({}, dict(variant="batchtopk", k=8, n_dedicated=200)),
}
"""Training recipes compared on the ground truth (bench/bench_ground_truth.py, 05_ground_truth)."""

GROUND_TRUTH_BASE = (
    dict(tokens_per_step=1024, train_tokens=SyntheticConfig.n_tokens, log_to="none", save_every=10**9),
    dict(dict_size=2000, dead_tokens=200_000),
)
"""What every preset shares: batch 1024, one pass over the default 1.5M tokens, dict 2000 (2x the true
features), a dead-latent window scaled to the run."""


def write_summary(
    path: str | Path, preset_name: str, overrides: dict, recovery: Recovery, tokens_per_second: float | None
) -> dict:
    """05's summary.json: the preset, its overrides, the recovery and the training throughput. A run read back
    (``tokens_per_second`` None) keeps the throughput measured when it was trained. Written atomically; returns
    what it wrote."""
    path = Path(path)
    if tokens_per_second is None and path.exists():
        tokens_per_second = read_summary(path)["tokens_per_second"]
    values = {
        "preset": preset_name,
        "overrides": overrides,
        "recovered": recovery.recovered,
        "classified": recovery.classified,
        "false_exclusive_rate": recovery.false_exclusive_rate,
        "tokens_per_second": tokens_per_second,
    }
    write_json(path, values)
    return values


def read_summary(path: str | Path) -> dict:
    """05's summary.json back (``write_summary``); a damaged file is refused naming it."""
    return read_json(path)


def preset(name: str, **overrides) -> tuple[TrainConfig, CrossCoderConfig]:
    """The configs of a named preset (``PRESETS``), with ``overrides`` given as fields of either config."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is not one of {list(PRESETS)}")
    fields = [{**base, **extra} for base, extra in zip(GROUND_TRUTH_BASE, PRESETS[name])]
    names = [{f.name for f in dataclasses.fields(cls)} for cls in (TrainConfig, CrossCoderConfig)]
    unknown = sorted(set(overrides) - names[0] - names[1])
    if unknown:
        raise ValueError(f"overrides {unknown} are fields of neither TrainConfig nor CrossCoderConfig")
    for key, value in overrides.items():
        fields[0 if key in names[0] else 1][key] = value
    return TrainConfig(**fields[0]), CrossCoderConfig(**fields[1])
