"""Each diffing method turned into candidates with a per-token score on the held-out rows (``Method``): the
crosscoder's top latents, the diff-SAE, PCA of Δx, the Activation Difference Lens and the token maps."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..analysis import (
    Analysis,
    difference_scores,
    distinct_top,
    ranking,
)
from ..analysis.encoding import encode
from ..analysis.health import dictionary_health
from ..files import read_json
from ..models import top_logit_effects
from ..normalize import load_norm_factors
from ..store import ActivationStore
from ..train import train_crosscoder
from .difference_source import CHUNK, DifferenceSource


class Method(NamedTuple):
    """One diffing method's candidates on the held-out rows."""

    name: str
    candidates: list[int]
    """The candidates in the method's ranking order: latent ids, component numbers, sequence positions."""
    scores: torch.Tensor
    """[n_val, n_candidates] each candidate's per-token score on the held-out rows (``Analysis.encoded.rows``)."""
    signed: bool
    """Whether a candidate may pick out its tokens by a low score as well as a high one (a direction's sign is
    arbitrary); latents, KL and norms pick out high scores only."""
    seconds: float
    """Wall-clock time the method took here (training included, where it trains)."""
    seed: int | None = None
    """The training seed of a method that trains (the crosscoder, the diff-SAE); None for the others, whose
    candidates are the same on every seed."""


def training_seconds(run_dir: str | Path) -> float:
    """The wall-clock seconds a run's training loop took (its timing.json; a resumed run's last part only)."""
    path = Path(run_dir) / "timing.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing (a run trained before it was written): train again with overwrite=True"
        )
    return read_json(path)["seconds"]


def crosscoder_method(analysis: Analysis, n_top: int = 20) -> Method:
    """The top ``n_top`` latents of the first fine-tune's difference ranking, one per duplicate group as 04
    shows them (``distinct_top``), scored by their activations; its seconds are its training's (03)."""
    order = next(iter(analysis.tables.values())).order
    latents = distinct_top(order, n_top, analysis.health.groups).latents
    scores = analysis.encoded.activations(latents)
    return Method("crosscoder", latents, scores, False, training_seconds(analysis.run_dir), analysis.run.cfg.seed)


def token_map_methods(analysis: Analysis) -> list[Method]:
    """The per-token KL(ft ‖ base) and ‖Δx‖ of 04's token divergence (``analysis.divergence``), one candidate
    each, with the seconds that pass took (the two models' forwards over the held-out documents)."""
    divergence = analysis.divergence
    return [
        Method("per-token KL", [0], divergence.kl[:, None], False, divergence.seconds),
        Method("‖Δx‖", [0], divergence.activation_difference[:, None], False, divergence.seconds),
    ]


def _differences(store: ActivationStore, factors: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """[len(rows), d_model] x_ft − x_base at store ``rows``, normalised units."""
    chunks = []
    for start in range(0, len(rows), CHUNK):
        x = store.read(rows[start : start + CHUNK]) * factors[None, :, None]
        chunks.append(x[:, 1] - x[:, 0])
    return torch.cat(chunks)


def _projections(
    store: ActivationStore, factors: torch.Tensor, rows: np.ndarray, directions: torch.Tensor, centre=None
) -> torch.Tensor:
    """[len(rows), n] each row's (Δx − ``centre``) · ``directions`` [d_model, n], read ``CHUNK`` rows at a
    time, so that memory does not grow with the rows read."""
    centre = torch.zeros(directions.shape[0], dtype=directions.dtype) if centre is None else centre
    return torch.cat(
        [
            (
                (_differences(store, factors, rows[start : start + CHUNK]).to(directions.dtype) - centre) @ directions
            ).float()
            for start in range(0, len(rows), CHUNK)
        ]
    )


def pca_method(analysis: Analysis, n_components: int = 20, max_rows: int = 200_000, seed: int = 0) -> Method:
    """The top ``n_components`` principal components of Δx on the training rows (about ``max_rows`` of them,
    drawn at random, where there are more), scored by each held-out token's projection on them (centred by the
    training mean). The covariance is summed ``CHUNK`` rows at a time: memory is d_model², whatever the rows."""
    start = time.perf_counter()
    store, factors = analysis.run.store, analysis.run.norm_factors
    span = store.split_range("train")
    train = np.arange(span.start, span.stop)
    if len(span) > max_rows:
        train = np.unique(np.random.default_rng(seed).integers(span.start, span.stop, max_rows))
    total = torch.zeros(store.d_model, dtype=torch.float64)
    products = torch.zeros(store.d_model, store.d_model, dtype=torch.float64)
    for part in range(0, len(train), CHUNK):
        delta = _differences(store, factors, train[part : part + CHUNK]).double()
        total += delta.sum(0)
        products += delta.T @ delta
    mean = total / len(train)
    covariance = (products - len(train) * torch.outer(mean, mean)) / max(len(train) - 1, 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    components = eigenvectors[:, eigenvalues.argsort(descending=True)[:n_components]]  # [d_model, n]
    scores = _projections(store, factors, analysis.encoded.rows, components, mean)
    return Method("PCA of Δx", list(range(1, components.shape[1] + 1)), scores, True, time.perf_counter() - start)


class DifferenceLens(NamedTuple):
    """The Activation Difference Lens: the mean activation difference at each of the first positions."""

    positions: list[int]
    """The sequence positions averaged (BOS, position 0, is never one)."""
    mean_difference: torch.Tensor
    """[n_positions, d_model] mean x_ft − x_base at each position, raw units."""
    n_documents: int
    """Documents averaged over."""


def difference_lens(
    store: ActivationStore, n_positions: int = 5, documents: np.ndarray | None = None, max_rows: int = 1_000_000
) -> DifferenceLens:
    """The mean raw x_ft − x_base at positions 1 … ``n_positions`` of the documents among the training split's
    first ``max_rows`` rows (those in ``documents``, sequence indices, when given: text unrelated to the
    fine-tune, as the method asks), summed ``CHUNK`` rows at a time."""
    rows = np.asarray(store.split_range("train")[:max_rows])
    seq, pos = (t.numpy() for t in store.positions(rows))
    keep = (pos >= 1) & (pos <= n_positions)
    if documents is not None:
        keep &= np.isin(seq, documents)
    if not keep.any():
        raise ValueError(f"no training rows at positions 1-{n_positions} of the documents chosen")
    rows, at = rows[keep], torch.from_numpy(pos[keep] - 1)
    sums = torch.zeros(n_positions, store.d_model, dtype=torch.float64)
    for start in range(0, len(rows), CHUNK):
        delta = _differences(store, torch.ones(store.n_models), rows[start : start + CHUNK])
        sums.index_add_(0, at[start : start + CHUNK], delta.double())
    counts = torch.bincount(at, minlength=n_positions)
    present = counts > 0
    means = (sums[present] / counts[present, None]).float()
    return DifferenceLens((present.nonzero().squeeze(1) + 1).tolist(), means, len(np.unique(seq[keep])))


def adl_method(analysis: Analysis, lens: DifferenceLens, seconds: float) -> Method:
    """ADL's directions (one per position of ``lens``), scored by each held-out token's projection of its raw
    Δx on them: a mean difference has a sign, so high projections count, as for a latent."""
    start = time.perf_counter()
    store = analysis.run.store
    directions = torch.nn.functional.normalize(lens.mean_difference, dim=-1)
    scores = _projections(store, torch.ones(store.n_models), analysis.encoded.rows, directions.T)
    return Method("ADL", lens.positions, scores, False, seconds + time.perf_counter() - start)


def logit_lens(pair, lens: DifferenceLens, n_tokens: int = 20) -> dict[str, dict[str, list[list[int]]]]:
    """Role -> {"promoted", "suppressed"} -> per position, the ``n_tokens`` token ids whose logits the mean
    difference raises (lowers) most, read through that model's final-norm scale and unembedding."""
    lists = {}
    for role, model in zip(("base", "finetuned"), pair.models):
        top = top_logit_effects(model, lens.mean_difference, n_tokens)
        lists[role] = {"promoted": top.promoted.indices.tolist(), "suppressed": top.suppressed.indices.tolist()}
    return lists


def diff_sae_method(analysis: Analysis, out_dir: str | Path, n_top: int = 20, seed: int | None = None) -> Method:
    """A BatchTopK SAE on Δx (normalised units) of the run's store, read from the store as it trains
    (``DifferenceSource``: no second store), trained as published (no decoder-norm penalty, k not annealed)
    with the crosscoder's TrainConfig, dictionary size, dead-latent window and L0 (a batchtopk crosscoder's k;
    a relu one's mean active latents on the held-out tokens, rounded) and ``seed`` (the crosscoder's when
    None) into ``out_dir/seed-<seed>`` (reused when trained there before), its live latents ranked by the
    activation-weighted mean KL(ft ‖ base) where they fire, as 04 ranks the crosscoder's. Its seconds count
    its training (timing.json) and encoding the held-out rows."""
    start = time.perf_counter()
    run = analysis.run
    seed = run.cfg.seed if seed is None else seed
    out_dir = Path(out_dir) / f"seed-{seed}"
    source = DifferenceSource(run.store, run.norm_factors, analysis.encoded.n_tokens)
    own = run.crosscoder.cfg
    cc_cfg = dataclasses.replace(
        own,
        variant="batchtopk",
        k=own.k if own.variant == "batchtopk" else max(1, round(analysis.encoded.l0)),
        norm_penalty=0.0,
        n_models=None,
        d_model=None,
        aux_coeff=None,
        k_aux=None,
        n_shared_latents=0,
        n_dedicated=0,
    )
    train_cfg = dataclasses.replace(run.cfg, log_to="none", k_anneal_factor=1.0, seed=seed)  # BatchTopK as published
    trained = time.perf_counter()
    sae = train_crosscoder(train_cfg, source, out_dir / "run", cc_cfg)
    training = time.perf_counter()
    held_out = ActivationStore(out_dir / "run/heldout")  # Δx of the rows 04 encoded, in their order
    encoded = encode(sae, held_out, load_norm_factors(held_out), "val")
    divergence = analysis.divergence
    difference = divergence.kl if divergence is not None else analysis.encoded.squared_difference[:, 1]
    order = ranking(encoded, difference_scores(encoded, difference))
    top = distinct_top(order, n_top, dictionary_health(sae, encoded).groups).latents
    scores = encoded.activations(top)
    seconds = time.perf_counter() - start - (training - trained) + training_seconds(out_dir / "run")
    return Method("diff-SAE", top, scores, False, seconds, seed)
