"""Scoring the methods against labelled tokens (the organism's planted behaviours): one rule for every
method, and methods.csv."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..analysis import (
    detection,
)
from .baselines import Method


class Cuts(NamedTuple):
    """Each candidate's best cut against labelled tokens (``best_cuts``), [n_candidates] each."""

    f1: torch.Tensor
    threshold: torch.Tensor
    """The lowest score kept (for a candidate cut by low scores, the negated score)."""
    sign: torch.Tensor
    """+1 where high scores are kept, -1 where low ones are."""


def best_cuts(scores: torch.Tensor, label: torch.Tensor, signed: bool = False) -> Cuts:
    """Each candidate's best cut of its ``scores`` [n, n_candidates] against ``label`` (bool [n]): its tokens
    above a threshold (or below one, when ``signed`` and that is better), ``analysis.detection`` over every
    token."""
    columns = torch.cat([scores, -scores], 1) if signed else scores
    n, width = columns.shape
    group = torch.arange(width).repeat(n)
    found = detection(group, columns.flatten(), label.repeat_interleave(width), width, int(label.sum()))
    if not signed:
        return Cuts(found.f1, found.threshold, torch.ones(width, dtype=torch.long))
    f1, side = found.f1.view(2, -1).max(0)  # ties keep high scores
    threshold = found.threshold.view(2, -1).gather(0, side[None])[0]
    return Cuts(f1, threshold, 1 - 2 * side)


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
    seed: int | None = None
    """The training seed of a method that trains (``Method.seed``); None for the others."""
    threshold: float | None = None
    """The score at that candidate's best cut (for a component picked out by low scores, the negated score)."""
    f1_positive: float | None = None
    """The same candidate's F1 where its score is above 0 at all (where a latent fires): far below ``best_f1``
    when it also fires weakly all over the text."""


def score_methods(
    methods: list[Method], labels: dict[str, torch.Tensor], rows: np.ndarray, n_top: int = 20, min_f1: float = 0.8
) -> list[MethodScore]:
    """Every method on every behaviour (``labels``: name -> bool [len(store)], read at the held-out ``rows``)."""
    result = []
    for method in methods:
        for name, label in labels.items():
            on = label[torch.from_numpy(rows)]
            if not on.any():  # the behaviour has no held-out token: nothing to score
                result.append(MethodScore(method.name, name, False, None, None, method.seconds, method.seed))
                continue
            cuts = best_cuts(method.scores[:, :n_top], on, method.signed)
            best = int(cuts.f1.argmax())
            positive = method.scores[:, best] * cuts.sign[best] > 0
            f1, f1_positive = float(cuts.f1[best]), 2 * float((on & positive).sum()) / int(positive.sum() + on.sum())
            result.append(
                MethodScore(
                    method.name,
                    name,
                    f1 >= min_f1,
                    f1,
                    best + 1,
                    method.seconds,
                    method.seed,
                    float(cuts.threshold[best]),
                    f1_positive,
                )
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


COLUMNS = (
    "method",
    "seed",
    "behaviour",
    "found",
    "best_f1",
    "threshold",
    "f1_positive",
    "rank",
    "seconds",
    "planted_kind",
)
"""The columns of methods.csv."""


def write_methods_csv(scores: list[MethodScore], planted_kinds: dict[str, str], path: str | Path) -> None:
    """methods.csv: one row per method, seed and behaviour (``COLUMNS``; empty where there is none: the seed of
    a method that does not train, the F1, threshold and rank of a behaviour without held-out tokens)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        blank = lambda value, form="{}": "" if value is None else form.format(value)
        for s in scores:
            writer.writerow(
                [
                    s.method,
                    blank(s.seed),
                    s.behaviour,
                    s.found,
                    blank(s.best_f1, "{:.4f}"),
                    blank(s.threshold, "{:.4f}"),
                    blank(s.f1_positive, "{:.4f}"),
                    blank(s.rank),
                    f"{s.seconds:.2f}",
                    planted_kinds[s.behaviour],
                ]
            )


def read_methods_csv(path: str | Path) -> list[dict]:
    """The rows of a methods.csv, typed: found bool, seconds float, seed and rank int or None, best_f1,
    threshold and f1_positive float or None."""
    typed = lambda value, kind: kind(value) if value else None
    with open(path, newline="") as file:
        return [
            {
                **row,
                "found": row["found"] == "True",
                "seconds": float(row["seconds"]),
                **{name: typed(row[name], int) for name in ("seed", "rank")},
                **{name: typed(row[name], float) for name in ("best_f1", "threshold", "f1_positive")},
            }
            for row in csv.DictReader(file)
        ]


def seconds_per_method(scores: list[MethodScore]) -> dict[str, float]:
    """Method -> its seconds (training or fitting, and scoring), as methods.csv records them: a method that
    trains, its first seed's."""
    seconds: dict[str, float] = {}
    for s in scores:
        seconds.setdefault(s.method, round(s.seconds, 1))
    return seconds
