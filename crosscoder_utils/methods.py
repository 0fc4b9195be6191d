"""The other model-diffing methods, scored beside the crosscoder on the same held-out tokens.

Each method turns a run's store (and models) into *candidates*: latents, components or directions, in the
method's own ranking order, each with a per-token score on the held-out (``val``) rows. ``score_methods``
asks of every method and planted behaviour whether one of its top candidates separates the behaviour's
tokens (best F1 over thresholds of its score), so every method is judged by one rule:

* ``crosscoder``: the top latents of 04's difference ranking (one per firing pattern), scored by their
  activations;
* ``diff-SAE``: a BatchTopK sparse autoencoder trained on Δx = x_ft − x_base with the crosscoder's dictionary
  size and tokens (the same training code: a crosscoder of one model), its latents ranked like 04's;
* ``PCA of Δx``: the top principal components of Δx, scored by each token's projection;
* ``ADL``: the Activation Difference Lens (Minder et al. 2026): the mean Δx over the first ``n_positions``
  positions of documents unrelated to the fine-tune, one direction per position, scored by each token's
  projection on it, and read through each model's unembedding (``logit_lens``);
* ``per-token KL`` and ``‖Δx‖``: the token map itself, KL(ft ‖ base) of the next-token distributions and the
  norm of the activation difference, one candidate each.

Everything is in normalised units (the crosscoder's) but ADL, which reads raw differences as published;
numbers only, figures in plots.py.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .analysis import Analysis, detection, difference_scores, distinct_top, ranking, token_divergence
from .analysis.encoding import encode
from .analysis.health import dictionary_health
from .analysis.planted import behaviour_labels, document_kinds
from .files import read_json
from .models import direct_logit_effect
from .normalize import estimate_norm_factors
from .store import ActivationStore
from .train import train_crosscoder


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
    return Method("crosscoder", latents, scores, False, training_seconds(analysis.run_dir))


def token_map_methods(analysis: Analysis) -> list[Method]:
    """The per-token KL(ft ‖ base) and ‖Δx‖ of 04's token divergence, one candidate each (timed again here:
    the two models' forwards over the held-out documents)."""
    start = time.perf_counter()
    divergence = token_divergence(
        analysis.pair, analysis.run.store, analysis.run.norm_factors, max_tokens=len(analysis.encoded.rows)
    )
    seconds = time.perf_counter() - start
    return [
        Method("per-token KL", [0], divergence.kl[:, None], False, seconds),
        Method("‖Δx‖", [0], divergence.activation_difference[:, None], False, seconds),
    ]


def _differences(store: ActivationStore, factors: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """[len(rows), d_model] x_ft − x_base at store ``rows``, normalised units."""
    chunks = []
    for start in range(0, len(rows), 65_536):
        x = store.read(rows[start : start + 65_536]) * factors[None, :, None]
        chunks.append(x[:, 1] - x[:, 0])
    return torch.cat(chunks)


def pca_method(analysis: Analysis, n_components: int = 20, max_rows: int = 200_000, seed: int = 0) -> Method:
    """The top ``n_components`` principal components of Δx on (up to ``max_rows``) training rows, scored by
    each held-out token's projection on them (centred by the training mean)."""
    start = time.perf_counter()
    store, factors = analysis.run.store, analysis.run.norm_factors
    train = np.asarray(store.split_range("train"))
    if len(train) > max_rows:
        train = np.sort(np.random.default_rng(seed).choice(train, max_rows, replace=False))
    delta = _differences(store, factors, train).double()
    mean = delta.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(delta.T))
    components = eigenvectors[:, eigenvalues.argsort(descending=True)[:n_components]]  # [d_model, n]
    held_out = _differences(store, factors, analysis.encoded.rows).double()
    scores = ((held_out - mean) @ components).float()
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
    store: ActivationStore, n_positions: int = 5, documents: np.ndarray | None = None
) -> DifferenceLens:
    """The mean raw x_ft − x_base at positions 1 … ``n_positions`` of the training split's documents (those in
    ``documents``, sequence indices, when given: text unrelated to the fine-tune, as the method asks)."""
    rows = np.asarray(store.split_range("train"))
    seq, pos = (t.numpy() for t in store.positions(rows))
    keep = (pos >= 1) & (pos <= n_positions)
    if documents is not None:
        keep &= np.isin(seq, documents)
    if not keep.any():
        raise ValueError(f"no training rows at positions 1-{n_positions} of the documents chosen")
    delta, at = _differences(store, torch.ones(store.n_models), rows[keep]), pos[keep]
    positions = np.unique(at).tolist()
    means = torch.stack([delta[torch.from_numpy(at == p)].mean(0) for p in positions])
    return DifferenceLens(positions, means, len(np.unique(seq[keep])))


def adl_method(analysis: Analysis, lens: DifferenceLens, seconds: float) -> Method:
    """ADL's directions (one per position of ``lens``), scored by each held-out token's projection of its raw
    Δx on them: a mean difference has a sign, so high projections count, as for a latent."""
    start = time.perf_counter()
    store = analysis.run.store
    held_out = _differences(store, torch.ones(store.n_models), analysis.encoded.rows)
    directions = torch.nn.functional.normalize(lens.mean_difference, dim=-1)
    scores = held_out @ directions.T
    return Method("ADL", lens.positions, scores, False, seconds + time.perf_counter() - start)


def logit_lens(pair, lens: DifferenceLens, n_tokens: int = 20) -> dict[str, dict[str, list[list[int]]]]:
    """Role -> {"promoted", "suppressed"} -> per position, the ``n_tokens`` token ids whose logits the mean
    difference raises (lowers) most, read through that model's final-norm scale and unembedding."""
    lists = {}
    for role, model in zip(("base", "finetuned"), pair.models):
        effect = direct_logit_effect(model, lens.mean_difference).cpu()
        lists[role] = {
            "promoted": effect.topk(n_tokens, dim=-1).indices.tolist(),
            "suppressed": (-effect).topk(n_tokens, dim=-1).indices.tolist(),
        }
    return lists


def diff_sae_method(analysis: Analysis, out_dir: str | Path, n_top: int = 20) -> Method:
    """A BatchTopK SAE on Δx (normalised units) of the run's store, trained as published (no decoder-norm
    penalty, k not annealed) with the crosscoder's TrainConfig, dictionary size, dead-latent window and L0
    (a batchtopk crosscoder's k; a relu one's mean active latents on the held-out tokens, rounded) into
    ``out_dir`` (reused when trained there before), its live latents ranked by the activation-weighted mean
    KL(ft ‖ base) where they fire, as 04 ranks the crosscoder's. Its seconds count its training (timing.json),
    writing its store and encoding the held-out rows."""
    start = time.perf_counter()
    run, out_dir = analysis.run, Path(out_dir)
    store = run.store
    delta = _differences(store, run.norm_factors, np.arange(len(store)))
    diff_store = ActivationStore.from_arrays(
        out_dir / "store",
        delta[:, None],
        token_ids=store.token_ids(np.arange(len(store))),
        val_fraction=store.meta["val_fraction"],
        models=["finetuned - base"],
    )
    factors = estimate_norm_factors(diff_store, n_batches=20)
    trained = time.perf_counter()
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
    train_cfg = dataclasses.replace(run.cfg, log_to="none", k_anneal_factor=1.0)  # BatchTopK as published
    sae = train_crosscoder(train_cfg, diff_store, out_dir / "run", cc_cfg)
    training = time.perf_counter()
    encoded = encode(sae, diff_store, factors, "val", max_tokens=len(analysis.encoded.rows))
    divergence = analysis.divergence
    difference = divergence.kl if divergence is not None else analysis.encoded.squared_difference[:, 1]
    order = ranking(encoded, difference_scores(encoded, difference))
    top = distinct_top(order, n_top, dictionary_health(sae, encoded).groups).latents
    scores = encoded.activations(top)
    seconds = time.perf_counter() - start - (training - trained) + training_seconds(out_dir / "run")
    return Method("diff-SAE", top, scores, False, seconds)


def best_f1(scores: torch.Tensor, label: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """[n_candidates] the best F1 of each candidate's tokens above a threshold of its score (or below one,
    when ``signed``) against ``label`` (bool [n]): ``analysis.detection`` over every token."""
    columns = torch.cat([scores, -scores], 1) if signed else scores
    n, width = columns.shape
    group = torch.arange(width).repeat(n)
    f1 = detection(group, columns.flatten(), label.repeat_interleave(width), width, int(label.sum())).f1
    return f1.view(2, -1).amax(0) if signed else f1


class MethodScore(NamedTuple):
    """How one method does on one planted behaviour (a row of methods.csv)."""

    method: str
    behaviour: str
    found: bool
    """A candidate among the top ``n_top`` separates the behaviour's tokens with F1 ≥ ``min_f1``."""
    best_f1: float | None
    """The best F1 of its top candidates (None for the logit lens, which has no per-token score, and where the
    behaviour has no held-out token)."""
    rank: int | None
    """1-based rank of that candidate in the method's order (for the logit lens: of the best-placed token)."""
    seconds: float


def score_methods(
    methods: list[Method], labels: dict[str, torch.Tensor], rows: np.ndarray, n_top: int = 20, min_f1: float = 0.8
) -> list[MethodScore]:
    """Every method on every behaviour (``labels``: name -> bool [len(store)], read at the held-out ``rows``)."""
    result = []
    for method in methods:
        for name, label in labels.items():
            on = label[torch.from_numpy(rows)]
            if not on.any():  # the behaviour has no held-out token: nothing to score
                result.append(MethodScore(method.name, name, False, None, None, method.seconds))
                continue
            f1 = best_f1(method.scores[:, :n_top], on, method.signed)
            best = int(f1.argmax())
            result.append(
                MethodScore(method.name, name, bool(f1[best] >= min_f1), float(f1[best]), best + 1, method.seconds)
            )
    return result


def listed_tokens(lists: dict) -> set[int]:
    """Every token id in ``logit_lens``'s lists: the share of the vocabulary they cover is the chance that a
    random token is "named" by the lens."""
    return {
        t for per_model in lists.values() for per_position in per_model.values() for ids in per_position for t in ids
    }


def score_logit_lens(
    lists: dict, behaviour_tokens: dict[str, list[int]], seconds: float, n_tokens: int = 20
) -> list[MethodScore]:
    """For each behaviour, whether one of its tokens is among ADL's top ``n_tokens`` promoted or suppressed
    tokens of either model at any position, and the best rank it reaches there."""
    result = []
    for name, tokens in behaviour_tokens.items():
        ranks = [
            ids[:n_tokens].index(t) + 1
            for per_model in lists.values()
            for per_position in per_model.values()
            for ids in per_position
            for t in tokens
            if t in ids[:n_tokens]
        ]
        result.append(MethodScore("ADL logit lens", name, bool(ranks), None, min(ranks, default=None), seconds))
    return result


class Comparison(NamedTuple):
    """Every method on every planted behaviour of the organism (``compare``)."""

    scores: list[MethodScore]
    """One row of methods.csv per method and behaviour."""
    planted_kinds: dict[str, str]
    """Behaviour -> its planted kind (added, removed, changed)."""
    crosscoder_kinds: dict[str, str]
    """Behaviour -> the kind 04 labels the crosscoder latent that separates it best among the top ``n_top``."""
    lens: DifferenceLens
    logit_lens: dict
    """``logit_lens``'s token ids: role -> promoted / suppressed -> per position."""


COLUMNS = ("method", "behaviour", "found", "best_f1", "rank", "seconds", "planted_kind")
"""The columns of methods.csv."""


def compare(
    analysis: Analysis,
    organism,
    out_dir: str | Path,
    n_top: int = 20,
    min_f1: float = 0.8,
    n_positions: int = 5,
) -> Comparison:
    """Run every method on the run ``analysis`` read (with its models) and score each on the planted
    behaviours of ``organism``; write ``out_dir/methods.csv`` (``COLUMNS``). ADL averages the organism's
    stories, the documents unrelated to the fine-tune; the diff-SAE is trained into ``out_dir/diff_sae``."""
    if analysis.pair is None:
        raise ValueError("the comparison needs a store collected from the models (per-token KL, logit lens)")
    store = analysis.run.store
    if not len(store.split_range("train")):
        raise ValueError(
            f"{store.path} holds only held-out rows (a run trained straight from the models): PCA, ADL and the "
            "diff-SAE need training rows; collect a store with 01 and train on it with 03"
        )
    training_seconds(analysis.run_dir)  # a run trained before timing.json existed is refused before any compute
    start = time.perf_counter()
    kinds = document_kinds(store, organism)
    lens = difference_lens(store, n_positions, np.flatnonzero(kinds == "story"))
    lists = logit_lens(analysis.pair, lens)
    lens_seconds = time.perf_counter() - start
    methods = [
        crosscoder_method(analysis, n_top),
        diff_sae_method(analysis, Path(out_dir) / "diff_sae", n_top),
        pca_method(analysis, n_top),
        adl_method(analysis, lens, lens_seconds),
        *token_map_methods(analysis),
    ]
    labels = behaviour_labels(store, organism)
    behaviours = organism.planted["behaviours"]
    scores = score_methods(methods, labels, analysis.encoded.rows, n_top, min_f1)
    scores += score_logit_lens(lists, {name: b["tokens"] for name, b in behaviours.items()}, lens_seconds)
    table = next(iter(analysis.tables.values()))
    latents = methods[0].candidates
    crosscoder_kinds = {
        s.behaviour: table.kind[latents[s.rank - 1]] for s in scores if s.method == "crosscoder" and s.rank
    }
    planted_kinds = {name: b["kind"] for name, b in behaviours.items()}
    write_methods_csv(scores, planted_kinds, Path(out_dir) / "methods.csv")
    return Comparison(scores, planted_kinds, crosscoder_kinds, lens, lists)


def write_methods_csv(scores: list[MethodScore], planted_kinds: dict[str, str], path: str | Path) -> None:
    """methods.csv: one row per method and behaviour (``COLUMNS``; best_f1 and rank empty where none)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        for s in scores:
            f1 = "" if s.best_f1 is None else f"{s.best_f1:.4f}"
            rank = "" if s.rank is None else s.rank
            writer.writerow([s.method, s.behaviour, s.found, f1, rank, f"{s.seconds:.2f}", planted_kinds[s.behaviour]])


def read_methods_csv(path: str | Path) -> list[dict]:
    """The rows of a methods.csv, typed: found bool, best_f1 float or None, rank int or None, seconds float."""
    with open(path, newline="") as file:
        return [
            {
                **row,
                "found": row["found"] == "True",
                "best_f1": float(row["best_f1"]) if row["best_f1"] else None,
                "rank": int(row["rank"]) if row["rank"] else None,
                "seconds": float(row["seconds"]),
            }
            for row in csv.DictReader(file)
        ]


def outcomes(comparison: Comparison, tie: float = 0.05) -> dict[str, str]:
    """Behaviour -> one sentence: the crosscoder's best F1 against the best other method's (of those with a
    per-token score), whether the crosscoder wins, ties (within ``tie``) or loses, and the kind of its latent."""
    sentences = {}
    for behaviour, planted in comparison.planted_kinds.items():
        rows = [s for s in comparison.scores if s.behaviour == behaviour and s.best_f1 is not None]
        if not rows:
            sentences[behaviour] = f"({planted}) no held-out token of it: not scored"
            continue
        own = next(s for s in rows if s.method == "crosscoder")
        best = max((s for s in rows if s.method != "crosscoder"), key=lambda s: s.best_f1)
        gap = own.best_f1 - best.best_f1
        outcome = "ties" if abs(gap) <= tie else "wins" if gap > 0 else "loses"
        kind = comparison.crosscoder_kinds.get(behaviour)
        sentences[behaviour] = (
            f"({planted}) crosscoder {outcome}: F1 {own.best_f1:.2f} (#{own.rank}) against {best.method} "
            f"{best.best_f1:.2f} (#{best.rank})" + f"; crosscoder latent {kind}" * bool(kind)
        )
    return sentences


def score_table(comparison: Comparison) -> dict[str, dict[str, str]]:
    """Method -> "behaviour (planted kind)" -> its best F1 and rank, ✓ where found: the methods with a per-token
    score, in the order they were scored."""
    table: dict[str, dict[str, str]] = {}
    for s in comparison.scores:
        if s.method == "ADL logit lens":  # no per-token score
            continue
        cell = "no held-out token" if s.best_f1 is None else f"{s.best_f1:.2f} #{s.rank}" + " ✓" * s.found
        table.setdefault(s.method, {})[f"{s.behaviour} ({comparison.planted_kinds[s.behaviour]})"] = cell
    return table


def logit_lens_summary(comparison: Comparison, vocabulary: int) -> str:
    """How many behaviours the ADL logit lens names, against the chance that its lists name a random word."""
    lens = [s for s in comparison.scores if s.method == "ADL logit lens"]
    found = [s.behaviour for s in lens if s.found]
    listed = len(listed_tokens(comparison.logit_lens))
    return (
        f"ADL logit lens, a behaviour's own word among the top 20 promoted or suppressed: {len(found)} of "
        f"{len(lens)} ({', '.join(found)}); the lists hold {listed} of the {vocabulary} tokens of the vocabulary, "
        f"so a random word is among them with probability {listed / vocabulary:.0%}"
    )


def seconds_per_method(scores: list[MethodScore]) -> dict[str, float]:
    """Method -> its seconds (training or fitting, and scoring), as methods.csv records them."""
    return {s.method: round(s.seconds, 1) for s in scores}
