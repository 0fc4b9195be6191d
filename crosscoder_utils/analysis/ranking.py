"""The difference ranking (each latent's difference score: the KL where it fires), its top one latent per
duplicate group, the findings table of that top, and the verdict that names the phrases where the models
differ."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from ..config import CHANGED_COSINE, EXCLUSIVE_SHARE
from ..crosscoder import CrossCoder
from ..store import ActivationStore
from .contexts import LatentSamples, context
from .encoding import Encoded
from .explanations import Explanations, PhraseGroup, phrase_groups
from .kinds import decoder_cosines, pair_kinds
from .lm import TokenDivergence
from .planted import EXPECTED_KINDS, BehaviourMatch

if TYPE_CHECKING:
    from .pipeline import Analysis


class DifferenceTable(NamedTuple):
    """Every latent compared between the base (model 0) and one fine-tune (``model_index``), on held-out tokens.
    Tensors are [dict_size]; ``order`` lists the live latents by ``difference_score``, highest first."""

    model_index: int
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
    """How much the models differ where the latent fires: activation-weighted mean KL(fine-tune ‖ base), nats
    (see ``difference_table``)."""
    order: torch.Tensor
    """int64 [n_live]: the live latents, highest difference_score first."""

    def live_kinds(self) -> dict[str, int]:
        """The live latents of each kind present, in the order the kinds first appear."""
        live = [kind for kind in self.kind if kind != "dead"]
        return {kind: live.count(kind) for kind in dict.fromkeys(live)}

    def rank(self, latent: int) -> int | None:
        """1-based rank of a latent in the difference ranking (None for a dead latent)."""
        found = (self.order == latent).nonzero()
        return int(found[0, 0]) + 1 if len(found) else None


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
    model_index: int = 1,
    exclusive_share: float = EXCLUSIVE_SHARE,
    changed_cosine: float = CHANGED_COSINE,
) -> DifferenceTable:
    """Every latent compared between the base and fine-tune ``model_index`` on held-out tokens: its kind, and how
    much it carries the difference between the models.

    difference_score: the mean, over the tokens where the latent fires and weighted by its activation, of
    how much the models differ there: KL(fine-tune ‖ base) of their next-token distributions (``divergence``),
    or without one (a store not collected from models) ‖x_m − x_base‖² at the site. Measured on the
    organism and on a pair with one changed token (bench/bench_difference_ranking.py), this put the
    planted latents above every other score tried; scores read off the decoders alone (cosine, decoder
    change, the part of the activation difference a latent writes) favour frequent latents that absorbed
    small, unplanted drift, and carry nothing for BatchTopK, whose decoder cosines are low throughout.

    Kinds: ``kinds.pair_kinds``, the one rule."""
    norms = cc.decoder_norms()
    relative = norms[:, model_index] / (norms[:, 0] + norms[:, model_index]).clamp(min=1e-12)
    if divergence is None:
        difference = encoded.squared_difference[:, model_index]
    elif np.array_equal(divergence.rows, encoded.rows):
        difference = divergence.kl
    else:
        raise ValueError("the divergence and the encoding cover different rows: compute both with the same max_tokens")
    score = difference_scores(encoded, difference)
    kind = pair_kinds(cc, encoded, model_index, exclusive_share, changed_cosine)
    frequency, cosine = encoded.frequency, decoder_cosines(cc, 0, model_index)
    return DifferenceTable(model_index, kind, frequency, relative, cosine, score, ranking(encoded, score))


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

    def as_row(self) -> dict:
        """The finding as a row of 04's table."""
        return {
            "rank": self.rank,
            "latent": self.latent,
            "kind": self.kind,
            "frequency": f"{self.frequency:.2%}",
            "difference score (KL)": round(self.difference_score, 2),
            "explanation": self.explanation,
            "fires on (planted)": self.fires_on,
            "twins (left out)": " ".join(f"#{rank}" for rank in self.twins),
            "top contexts": "   |   ".join(self.contexts),
        }


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
                explanations.described(latent),
            )
        )
    return result


class Answer(NamedTuple):
    """What changed, read off one difference table (``answer``)."""

    top: TopLatents
    """The top of the ranking, one latent per duplicate group."""
    groups: list[PhraseGroup]
    """The top's latents grouped by the phrase or context they fire in, by rank."""
    base_groups: list[PhraseGroup]
    """The same for the top quarter of the ranking among the latents the base writes more (relative norm
    < 0.5): what the fine-tune no longer does, kept short so that the verdict reads as one answer."""


def answer(analysis: Analysis, table: DifferenceTable, n_top: int) -> Answer:
    """The top ``n_top`` latents of ``table``'s ranking and the phrases they fire in, and the same for the
    top ``n_top // 4`` (at least 1) on the base side."""
    top = distinct_top(table.order, n_top, analysis.health.groups)
    base_order = table.order[table.relative_norm[table.order] < 0.5]
    base_top = distinct_top(base_order, max(1, n_top // 4), analysis.health.groups)
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


def planted_found(matches: dict[str, BehaviourMatch], top: TopLatents, min_f1: float) -> dict[str, bool]:
    """Behaviour -> whether its best latent reaches ``min_f1`` and is in ``top`` or a twin of one there."""
    shown = set(top.latents).union(*top.twins)
    return {name: m.f1 >= min_f1 and m.latent in shown for name, m in matches.items()}


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
    found = [name for name, hit in planted_found(matches, top, min_f1).items() if hit]
    sentence += f"; {len(found)} of {len(matches)} found in the top {n} with F1 ≥ {min_f1}"
    if planted_kinds:
        expected = [name for name, m in matches.items() if table.kind[m.latent] in EXPECTED_KINDS[planted_kinds[name]]]
        rule = ", ".join(f"{planted}: {' or '.join(kinds)}" for planted, kinds in EXPECTED_KINDS.items())
        sentence += f"; {len(expected)} of {len(matches)} of the kind their planting implies ({rule})"
    return sentence + "."


class RoleReport(NamedTuple):
    """What 04 shows for one fine-tune against the base."""

    role: str
    table: DifferenceTable
    answer: Answer
    verdict: str
    findings: list[Finding]


def role_reports(analysis: Analysis, samples: LatentSamples, tokenizer) -> list[RoleReport]:
    """For each fine-tune (``analysis.tables``), its top latents and their phrases (``answer``), the verdict and
    the findings of its top; the planted behaviours are scored against the first fine-tune only."""
    cfg, reports = analysis.cfg, []
    for model_index, (role, table) in enumerate(analysis.tables.items(), start=1):
        planted = (analysis.matches, analysis.mains) if model_index == 1 else (None, None)
        answered = answer(analysis, table, cfg.n_top)
        rows = findings(
            table, samples, cfg.n_contexts, analysis.run.store, tokenizer, answered.top, analysis.explanations, *planted
        )
        said = verdict(table, answered, *planted, cfg.min_f1, analysis.planted_kinds)
        reports.append(RoleReport(role, table, answered, said, rows))
    return reports
