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


COLUMNS = ("method", "behaviour", "found", "best_f1", "rank", "seconds", "planted_kind")
"""The columns of methods.csv."""


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


def seconds_per_method(scores: list[MethodScore]) -> dict[str, float]:
    """Method -> its seconds (training or fitting, and scoring), as methods.csv records them."""
    return {s.method: round(s.seconds, 1) for s in scores}
