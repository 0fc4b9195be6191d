"""``compare``: every method on a run, side by side, and on the organism scored; the lines 06 prints."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..analysis import Analysis
from ..analysis.explanations import described
from ..analysis.planted import document_kinds
from ..seeds import span, train_seeds
from .baselines import (
    DifferenceLens,
    Method,
    adl_method,
    crosscoder_method,
    diff_sae_method,
    difference_lens,
    logit_lens,
    pca_method,
    token_map_methods,
    training_seconds,
)
from .candidates import Candidate, agreement, describe, write_candidates_csv
from .scoring import MethodScore, listed_tokens, score_logit_lens, score_methods, write_methods_csv


class Comparison(NamedTuple):
    """Every method on the same held-out tokens (``compare``): their top candidates side by side and where they
    agree; on the organism, also each method scored on each planted behaviour."""

    methods: list[Method]
    candidates: list[Candidate]
    """Every method's top candidates, described (``describe``), in the order of ``methods``."""
    agreements: list[list[Candidate]]
    """Groups of candidates of several methods whose top held-out tokens are largely the same (``agreement``)."""
    scores: list[MethodScore]
    """On the organism, one row of methods.csv per method, behaviour and training seed (one seed for the
    methods that do not train); [] elsewhere."""
    planted_kinds: dict[str, str]
    """Behaviour -> its planted kind (added, removed, changed); {} elsewhere."""
    crosscoder_kinds: dict[str, list[str]]
    """Behaviour -> on each seed, the kind 04 labels the crosscoder latent that separates it best among the
    top ``n_top``."""
    lens: DifferenceLens
    logit_lens: dict
    """``logit_lens``'s token ids: role -> promoted / suppressed -> per position."""


def trained_methods(analysis: Analysis, run: Analysis, out_dir: Path, n_top: int) -> list[Method]:
    """The methods that train, on the training seed of ``run`` (``analysis`` itself, or one of its other seeds
    from ``train_seeds``): the run's crosscoder and a diff-SAE trained with that seed and otherwise the
    settings ``diff_sae_method`` takes from ``analysis`` (the same L0 on every seed)."""
    return [
        crosscoder_method(run, n_top),
        diff_sae_method(analysis, out_dir / "diff_sae", n_top, run.run.cfg.seed),
    ]


def run_methods(analysis: Analysis, out_dir: Path, n_top: int, lens: DifferenceLens, lens_seconds: float):
    """Every method on the run ``analysis`` read, in the order reports show them: the one place they are listed
    (those that train in ``trained_methods``)."""
    return [
        *trained_methods(analysis, analysis, out_dir, n_top),
        pca_method(analysis, n_top),
        adl_method(analysis, lens, lens_seconds),
        *token_map_methods(analysis),
    ]


def compare(
    analysis: Analysis,
    out_dir: str | Path,
    n_top: int = 20,
    min_f1: float = 0.8,
    n_positions: int = 5,
    n_contexts: int = 3,
    n_seeds: int = 3,
    device: str = "auto",
) -> Comparison:
    """Run every method (``run_methods``) on the run ``analysis`` read (with its models), describe each one's top
    ``n_top`` candidates and where methods agree, and write ``out_dir/candidates.csv`` (``CANDIDATE_COLUMNS``).
    When the store is the organism's (``analysis.organism``), also score each method on the planted behaviours
    into ``out_dir/methods.csv`` (``COLUMNS``), the two that train (the crosscoder, the diff-SAE) on ``n_seeds``
    training seeds each (the run's and the next ones: ``train_seeds``); ADL then averages the organism's
    stories, the documents unrelated to the fine-tune, and elsewhere the training documents. The diff-SAE is
    trained into ``out_dir/diff_sae``."""
    if analysis.pair is None:
        raise ValueError("the comparison needs a store collected from the models (per-token KL, logit lens)")
    store, organism, out_dir = analysis.run.store, analysis.organism, Path(out_dir)
    if not len(store.split_range("train")):
        raise ValueError(
            f"{store.path} holds only held-out rows (a run trained straight from the models): PCA, ADL and the "
            "diff-SAE need training rows; collect a store with 01 and train on it with 03"
        )
    training_seconds(analysis.run_dir)  # a run trained before timing.json existed is refused before any compute
    start = time.perf_counter()
    stories = np.flatnonzero(document_kinds(store, organism) == "story") if organism else None
    lens = difference_lens(store, n_positions, stories)
    lists = logit_lens(analysis.pair, lens)
    methods = run_methods(analysis, out_dir, n_top, lens, time.perf_counter() - start)
    candidates = [c for method in methods for c in describe(method, analysis, n_contexts)]
    write_candidates_csv(candidates, out_dir / "candidates.csv")
    scores, planted_kinds, crosscoder_kinds = [], {}, {}
    if organism:
        behaviours = organism.planted["behaviours"]
        runs = train_seeds(analysis, n_seeds, device)
        seeded = methods + [method for run in runs[1:] for method in trained_methods(analysis, run, out_dir, n_top)]
        scores = score_methods(seeded, analysis.labels, analysis.encoded.rows, n_top, min_f1)
        adl_seconds = next(m.seconds for m in methods if m.name == "ADL")
        scores += score_logit_lens(lists, {name: b["tokens"] for name, b in behaviours.items()}, adl_seconds)
        crosscoders = {m.seed: m.candidates for m in seeded if m.name == "crosscoder"}
        tables = {run.run.cfg.seed: next(iter(run.tables.values())) for run in runs}
        for s in scores:
            if s.method == "crosscoder" and s.rank:
                kind = tables[s.seed].kind[crosscoders[s.seed][s.rank - 1]]
                crosscoder_kinds.setdefault(s.behaviour, []).append(kind)
        planted_kinds = {name: b["kind"] for name, b in behaviours.items()}
        write_methods_csv(scores, planted_kinds, out_dir / "methods.csv")
    return Comparison(methods, candidates, agreement(candidates), scores, planted_kinds, crosscoder_kinds, lens, lists)


def candidate_table(comparison: Comparison, n_show: int = 5) -> list[dict]:
    """Rows of 06's side-by-side table: each method's first ``n_show`` candidates with explanation and context."""
    return [
        {
            "method": c.method,
            "#": c.rank,
            "candidate": c.candidate,
            "explanation": described(c.explanation, c.explanation_f1),
            "top context": c.contexts[0] if c.contexts else "",
        }
        for c in comparison.candidates
        if c.rank <= n_show
    ]


def agreement_lines(comparison: Comparison, n: int = 12) -> list[str]:
    """The ``n`` best-placed groups of ``agreement`` as sentences: the methods' candidates and the place they
    share (the best-placed candidate's top context)."""
    lines = []
    for group in comparison.agreements[:n]:
        first = min(group, key=lambda c: c.rank)
        where = first.contexts[0] if first.contexts else f"row {first.top_rows[0]}"
        lines.append(", ".join(f"{c.method} #{c.rank}" for c in group) + f": {where} ({first.explanation})")
    return lines


def logit_lens_lines(lists: dict, positions: list[int], decode, n: int = 12) -> list[str]:
    """``logit_lens``'s lists as lines, the first ``n`` tokens of each, ``decode``d: one per role, direction and
    position, or one for all roles where their lists are the same (the models' final-norm scales and
    unembeddings then read the difference alike: a fine-tune that kept its embedding, tied to the
    unembedding, and barely moved its final norm)."""
    roles = list(lists)
    same = all(lists[role] == lists[roles[0]] for role in roles)
    shown = {" = ".join(roles): lists[roles[0]]} if same else lists
    lines = [
        f"{role} {direction:>10} at position {position}: {decode(ids[:n])!r}"
        for role, per_direction in shown.items()
        for direction, per_position in per_direction.items()
        for position, ids in zip(positions, per_position)
    ]
    if same:
        lines.append(f"(the same lists for {' and '.join(roles)}: their final norms and unembeddings read Δx alike)")
    return lines


def over_seeds(scores: list[MethodScore]) -> dict[tuple[str, str], list[MethodScore]]:
    """(method, behaviour) -> its scores, one per training seed (one for a method that does not train), for the
    methods with a per-token score and the behaviours with held-out tokens."""
    grouped: dict[tuple[str, str], list[MethodScore]] = {}
    for s in scores:
        if s.best_f1 is not None:
            grouped.setdefault((s.method, s.behaviour), []).append(s)
    return grouped


def outcomes(comparison: Comparison, tie: float = 0.05) -> dict[str, str]:
    """Behaviour -> one sentence: on how many training seeds the crosscoder wins, ties (within ``tie``) or loses
    against the best other method with a per-token score on that seed, its F1 range at the best threshold and
    where its latent fires at all, the others' best F1 range, and the kinds of its latent."""
    grouped, sentences = over_seeds(comparison.scores), {}
    for behaviour, planted in comparison.planted_kinds.items():
        own = grouped.get(("crosscoder", behaviour))
        if not own:
            sentences[behaviour] = f"({planted}) no held-out token of it: not scored"
            continue
        counts, others = Counter(), []
        for s in own:  # each seed's crosscoder against each other method on the same seed, or on its only one
            rows = [
                next((o for o in grouped[method, behaviour] if o.seed == s.seed), grouped[method, behaviour][0])
                for method, b in grouped
                if b == behaviour and method != "crosscoder"
            ]
            best = max(rows, key=lambda o: o.best_f1)
            gap = s.best_f1 - best.best_f1
            counts["ties" if abs(gap) <= tie else "wins" if gap > 0 else "loses"] += 1
            others.append(best)
        won = ", ".join(f"{outcome} on {n}" for outcome, n in counts.most_common())
        kinds = ", ".join(f"{kind} {n}" for kind, n in Counter(comparison.crosscoder_kinds.get(behaviour, [])).items())
        sentences[behaviour] = (
            f"({planted}) crosscoder {won} of {len(own)} seed{'s' * (len(own) > 1)}: F1 "
            f"{span([s.best_f1 for s in own])} (#{span([s.rank for s in own], '{}')}, activation ≥ "
            f"{span([s.threshold for s in own])}; where it fires at all {span([s.f1_positive for s in own])}) "
            f"against {span([o.best_f1 for o in others])} ({', '.join(dict.fromkeys(o.method for o in others))})"
            + (f"; crosscoder latent {kinds}" if kinds else "")
        )
    return sentences


def score_table(comparison: Comparison) -> dict[str, dict[str, str]]:
    """Method -> "behaviour (planted kind)" -> its best F1 and rank, ✓ where found (a method that trains: their
    ranges over the seeds, and on how many seeds it is found): the methods with a per-token score, in the
    order they were scored."""
    table: dict[str, dict[str, str]] = {}
    grouped = over_seeds(comparison.scores)
    for s in comparison.scores:
        if s.method == "ADL logit lens" or s.seed not in (None, comparison.scores[0].seed):  # one cell per pair
            continue
        rows = grouped.get((s.method, s.behaviour))
        found = sum(r.found for r in rows or [])
        if not rows:
            cell = "no held-out token"
        elif len(rows) == 1:
            cell = f"{s.best_f1:.2f} #{s.rank}" + " ✓" * s.found
        else:
            cell = f"{span([r.best_f1 for r in rows])} #{span([r.rank for r in rows], '{}')}" + (
                f" ✓ {found} of {len(rows)}" if found else ""
            )
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


def found_counts(comparison: Comparison) -> str:
    """How many planted behaviours each method finds on every training seed, and on some, from its own scores
    (the logit lens apart)."""
    every: dict[str, list[int]] = {}
    for (method, _), rows in over_seeds(comparison.scores).items():
        counts = every.setdefault(method, [0, 0, len(rows)])
        counts[0] += all(r.found for r in rows)
        counts[1] += any(r.found for r in rows) and not all(r.found for r in rows)
    if not every:
        return "no planted behaviour has a held-out token: nothing to count"
    n = {method: len({s.behaviour for s in comparison.scores if s.method == method}) for method in every}
    return "behaviours found on every training seed: " + ", ".join(
        f"{method} {k} of {n[method]}"
        + (f" ({seeds} seeds; {some} more on some)" if some else f" ({seeds} seeds)" if seeds > 1 else "")
        for method, (k, some, seeds) in every.items()
    )
