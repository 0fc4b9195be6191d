"""Any method's top candidates described without labels, as 04 describes a latent (explanations, top
contexts), and where the methods agree."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

import torch

from ..analysis import Analysis, context, explain, latent_samples
from ..analysis.encoding import Encoded
from ..analysis.explanations import f1_text
from .baselines import Method


class Candidate(NamedTuple):
    """One of a method's top candidates, described by where its score is high, without labels."""

    method: str
    rank: int
    """1-based, in the method's order."""
    candidate: int
    """The method's id of it (a latent, a component number, a position)."""
    explanation: str
    """Its rule of where the score is high (``explanations.explain`` over its top tokens)."""
    explanation_f1: float
    """That rule's detection F1 on the scoring half (NaN where the candidate is high nowhere)."""
    contexts: list[str]
    """Its top held-out contexts (the token in «»)."""
    top_rows: list[int]
    """The held-out store rows where its score is highest, highest first (``N_AGREE`` at most)."""


N_AGREE = 50
"""Top held-out rows of a candidate compared with another method's (``agreement``)."""


def top_tokens(method: Method, encoded) -> Encoded:
    """``method``'s top candidates as latents of an ``Encoded`` on the held-out rows, so that a latent's tools
    (explanations, top contexts) describe any method's candidates: each candidate's score oriented so its
    largest magnitude is positive (a component's sign is arbitrary), and on the tokens where it is positive,
    its top 2 % (at least ``N_AGREE``), where a dense score such as the KL or a projection is high."""
    scores = method.scores.clone()
    if method.signed:
        flip = scores.amax(0) < -scores.amin(0)
        scores[:, flip] = -scores[:, flip]
    keep = max(N_AGREE, len(scores) // 50)
    if keep < len(scores):
        floor = scores.topk(keep, dim=0).values[-1]
        scores = torch.where(scores >= floor, scores, 0.0)
    token, latent = (scores > 0).nonzero(as_tuple=True)
    order = torch.argsort(token * scores.shape[1] + latent)
    token, latent = token[order], latent[order]
    return encoded._replace(token=token, latent=latent, value=scores[token, latent], dict_size=scores.shape[1])


def describe(method: Method, analysis: Analysis, n_contexts: int = 3) -> list[Candidate]:
    """Each of ``method``'s candidates with its explanation and its top contexts, from ``top_tokens``."""
    encoded, store = top_tokens(method, analysis.encoded), analysis.run.store
    tokenizer = analysis.pair.tokenizer if analysis.pair else None
    rules = explain(encoded, store, tokenizer)
    rows = latent_samples(encoded, N_AGREE, 1).top_rows
    result = []
    for i, candidate in enumerate(method.candidates):
        top = [r for r in rows[i].tolist() if r >= 0]
        contexts = [context(store, tokenizer, r) for r in top[:n_contexts]] if tokenizer else []
        result.append(Candidate(method.name, i + 1, candidate, rules.text[i], float(rules.f1[i]), contexts, top))
    return result


def agreement(candidates: list[Candidate], min_overlap: float = 0.5) -> list[list[Candidate]]:
    """Places where several methods agree. In rank order (the methods' first candidates, then their second...),
    each candidate not yet in a group seeds one, joined by every candidate of another method not yet in a
    group whose top rows (``N_AGREE`` each) share at least ``min_overlap`` with the seed's
    (|A ∩ B| / min(|A|, |B|)); a seed that no other method joins makes no group. Each group is in the
    candidates' order. Candidates join the seed itself, not one another: linked in chains (A shares half
    of its top with B, B half with C...), the top of every method on a real pair made one group."""
    tops = [set(c.top_rows) for c in candidates]
    agrees = lambda i, j: (
        candidates[i].method != candidates[j].method
        and tops[i]
        and tops[j]
        and len(tops[i] & tops[j]) / min(len(tops[i]), len(tops[j])) >= min_overlap
    )
    grouped, groups = set(), []
    for seed in sorted(range(len(candidates)), key=lambda i: candidates[i].rank):
        if seed in grouped:
            continue
        joined = [j for j in range(len(candidates)) if j not in grouped and agrees(seed, j)]
        if joined:
            grouped.update([seed, *joined])
            groups.append([candidates[i] for i in sorted([seed, *joined])])
    return groups


CANDIDATE_COLUMNS = ("method", "rank", "candidate", "explanation", "explanation_f1", "top_context")
"""The columns of candidates.csv."""


def write_candidates_csv(candidates: list[Candidate], path: str | Path) -> None:
    """candidates.csv: every method's top candidates with their explanation and top context."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CANDIDATE_COLUMNS)
        for c in candidates:
            top = c.contexts[0] if c.contexts else ""
            writer.writerow([c.method, c.rank, c.candidate, c.explanation, f1_text(c.explanation_f1, 4), top])
