"""``compare``: every method on a run, side by side, and on the organism scored; the lines 06 prints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..analysis import Analysis
from ..analysis.explanations import described
from ..analysis.planted import document_kinds
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
    """On the organism, one row of methods.csv per method and behaviour; [] elsewhere."""
    planted_kinds: dict[str, str]
    """Behaviour -> its planted kind (added, removed, changed); {} elsewhere."""
    crosscoder_kinds: dict[str, str]
    """Behaviour -> the kind 04 labels the crosscoder latent that separates it best among the top ``n_top``."""
    lens: DifferenceLens
    logit_lens: dict
    """``logit_lens``'s token ids: role -> promoted / suppressed -> per position."""


def run_methods(analysis: Analysis, out_dir: Path, n_top: int, lens: DifferenceLens, lens_seconds: float):
    """Every method on the run ``analysis`` read, in the order reports show them: the one place they are listed."""
    return [
        crosscoder_method(analysis, n_top),
        diff_sae_method(analysis, out_dir / "diff_sae", n_top),
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
) -> Comparison:
    """Run every method (``run_methods``) on the run ``analysis`` read (with its models), describe each one's top
    ``n_top`` candidates and where methods agree, and write ``out_dir/candidates.csv`` (``CANDIDATE_COLUMNS``).
    When the store is the organism's (``analysis.organism``), also score each method on the planted behaviours
    into ``out_dir/methods.csv`` (``COLUMNS``); ADL then averages the organism's stories, the documents
    unrelated to the fine-tune, and elsewhere the training documents. The diff-SAE is trained into
    ``out_dir/diff_sae``."""
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
        scores = score_methods(methods, analysis.labels, analysis.encoded.rows, n_top, min_f1)
        adl_seconds = next(m.seconds for m in methods if m.name == "ADL")
        scores += score_logit_lens(lists, {name: b["tokens"] for name, b in behaviours.items()}, adl_seconds)
        table = next(iter(analysis.tables.values()))
        latents = next(m for m in methods if m.name == "crosscoder").candidates
        crosscoder_kinds = {
            s.behaviour: table.kind[latents[s.rank - 1]] for s in scores if s.method == "crosscoder" and s.rank
        }
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


def found_counts(comparison: Comparison) -> str:
    """How many planted behaviours each method finds, from its own scores (the logit lens apart)."""
    counts: dict[str, list[int]] = {}
    for s in comparison.scores:
        if s.method != "ADL logit lens":
            counts.setdefault(s.method, [0, 0])
            counts[s.method][0] += s.found
            counts[s.method][1] += 1
    return "behaviours found: " + ", ".join(f"{method} {found} of {n}" for method, (found, n) in counts.items())
