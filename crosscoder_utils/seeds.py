"""Results over training seeds: a run trained again with other seeds, and on the organism each planted
behaviour scored on every seed, so that a report says what holds on all of them."""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from .analysis import EXPECTED_KINDS, Analysis, distinct_top, planted_found, reanalyse
from .train import train_crosscoder


def train_seeds(analysis: Analysis, n_seeds: int, device: str = "auto") -> list[Analysis]:
    """``analysis`` and its run trained again with the next ``n_seeds`` - 1 seeds, its settings otherwise, on
    ``device``, into ``<run_dir>/seeds/<seed>`` (reused when trained there before), each read by ``reanalyse``.
    A run trained straight from the models has no store of training rows to train again on: it stands alone,
    with a warning."""
    run = analysis.run
    if n_seeds < 1:
        raise ValueError(f"n_seeds={n_seeds}: at least the run itself (1)")
    if n_seeds > 1 and not len(run.store.split_range("train")):
        warnings.warn(
            f"{run.store.path} holds only held-out rows (a run trained straight from the models): the other seeds "
            "cannot be trained on it, so the results are the run's alone; collect a store with 01 to train on",
            stacklevel=2,
        )
        n_seeds = 1
    result = [analysis]
    for seed in range(run.cfg.seed + 1, run.cfg.seed + n_seeds):
        out = Path(analysis.run_dir) / "seeds" / str(seed)
        cfg = dataclasses.replace(run.cfg, seed=seed, log_to="none", device=device)
        train_crosscoder(cfg, run.store, out, run.crosscoder.cfg)
        result.append(reanalyse(analysis, out, device))
    return result


def span(values, form: str = "{:.2f}") -> str:
    """``min-max`` of ``values`` (over seeds) written with ``form``, or the one value where they agree."""
    return "-".join(dict.fromkeys(form.format(v) for v in (min(values), max(values))))


class BehaviourOverSeeds(NamedTuple):
    """One planted behaviour's best latent on each seed's run (``planted_over_seeds``)."""

    behaviour: str
    planted: str
    """Its planted kind: added, removed, changed."""
    found: list[bool]
    """Per seed: the best latent reaches ``min_f1`` and is in the top ``n_top`` or a twin of one there."""
    f1: list[float]
    f1_firing: list[float]
    """Per seed: the best latent's F1 where it fires at all (activation > 0), against its best threshold's."""
    ranks: list[int | None]
    kinds: list[str]
    n_tokens: int
    """The behaviour's held-out tokens: none, and it is not scored."""

    def as_row(self) -> dict:
        n = len(self.found)
        ranks = [r for r in self.ranks if r is not None]
        if not self.n_tokens:
            return {"behaviour": self.behaviour, "planted as": self.planted, "found on": "no held-out token"}
        return {
            "behaviour": self.behaviour,
            "planted as": self.planted,
            "found on": f"{sum(self.found)} of {n}",
            "F1": span(self.f1),
            "F1 where it fires": span(self.f1_firing),
            "rank": span(ranks, "{}") if ranks else "-",
            "kinds": ", ".join(f"{kind} {count}" for kind, count in Counter(self.kinds).most_common()),
            "as planted on": f"{sum(k in EXPECTED_KINDS[self.planted] for k in self.kinds)} of {n}",
        }


def planted_over_seeds(analyses: list[Analysis]) -> list[BehaviourOverSeeds]:
    """On the organism, each planted behaviour's best latent on every run of ``analyses`` (``train_seeds``):
    found or not as the verdict counts it (F1 ≥ ``min_f1``, in the top ``n_top`` or a twin of one there), its
    F1 at its best threshold and where it fires at all, its rank and its kind."""
    cfg, results = analyses[0].cfg, {}
    for analysis in analyses:
        table = next(iter(analysis.tables.values()))
        top = distinct_top(table.order, cfg.n_top, analysis.health.groups)
        found = planted_found(analysis.matches, top, cfg.min_f1)
        for name, m in analysis.matches.items():
            planted = analysis.planted_kinds[name]
            result = results.setdefault(name, BehaviourOverSeeds(name, planted, [], [], [], [], [], m.n_tokens))
            result.found.append(found[name])
            result.f1.append(m.f1)
            result.f1_firing.append(m.f1_firing)
            result.ranks.append(table.rank(m.latent))
            result.kinds.append(table.kind[m.latent])
    return list(results.values())


def seeds_reading(results: list[BehaviourOverSeeds], min_f1: float, n_top: int) -> str:
    """One sentence from ``planted_over_seeds``: the behaviours found on every seed, on some, on none (those
    without held-out tokens apart)."""
    n = len(results[0].found)
    unscored = [r.behaviour for r in results if not r.n_tokens]
    results = [r for r in results if r.n_tokens]
    every = [r.behaviour for r in results if all(r.found)]
    some = [f"{r.behaviour} ({sum(r.found)} of {n})" for r in results if 0 < sum(r.found) < n]
    none = [r.behaviour for r in results if not any(r.found)]
    listed = lambda names: ", ".join(names) or "none"
    return (
        f"Over {n} training seed{'s' * (n > 1)}, a latent with F1 ≥ {min_f1} in the top {n_top} on every seed "
        f"for {len(every)} of {len(results)} behaviours ({listed(every)}); on some seeds for {listed(some)}; on "
        f"none for {listed(none)}" + f"; not scored (no held-out token): {listed(unscored)}" * bool(unscored) + "."
    )
