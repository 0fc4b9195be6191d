"""Explanations of latents without an LLM: for every live latent, the short rule about the held-out text that
best predicts where it fires, chosen on one half of the held-out sequences and scored on the other (the
*detection* F1 of the auto-interpretability literature: how well the explanation tells the tokens where the
latent fires from those where it does not).

Rules (each token's features, from the store's token ids and positions):

* ``token``: the token is one of up to ``MAX_TOKENS`` tokens: ``«,» «.»``;
* ``after``: the token after a given token: ``«<|end|>» after "?"``;
* ``after phrase``: the token after a given two-token phrase: ``« one» after " three two"``;
* ``context``: any token within ``WINDOW`` tokens after a given token of the same sequence:
  ``within 32 tokens after «<|assistant|>»``.

A document's first position, where the rows read do not hold it (its BOS, which collection drops), is a token of
its own for the rules, ``START``: ``«:» after "⟨start⟩"`` is a «:» that opens a document.

A rule's detection F1 combines its precision (the share of the tokens it covers where the latent fires) with
its recall weighted by activation (the share of the latent's firings it covers, each firing counted in
proportion to its activation over the latent's largest), so that weak firings elsewhere, common in relu
dictionaries, cost a rule little while a rule covering tokens where the latent is silent costs it in full.
Within a kind the rules of one token are disjoint (a token has one identity, one previous token), so the
sums of a set of them add up, and the set is grown in order of precision.
Every count is one ``torch.unique`` over (latent, feature) keys of all the firings at once: no loop over
latents. The rule with the best F1 on the fitting half is scored on the scoring half; under ``MIN_F1`` the
latent gets "no simple rule". A polysemantic latent, or one whose weak firings no rule covers, scores low.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch

from ..store import ActivationStore
from .encoding import Encoded
from .health import connected_groups

WINDOW = 32
"""Tokens after a context token within which a ``context`` rule holds."""
MAX_TOKENS = 3
"""Tokens of a ``token`` rule at most."""
MIN_F1 = 0.5
"""Detection F1 on the scoring half under which a latent has no simple rule."""
MIN_FIRINGS = 5
"""Firings a latent needs on each half to be judged: with fewer, any rule's F1 is noise, and the latent is
reported as too rare to judge, not as having no rule."""
KINDS = ("token", "after", "after phrase", "context")
START = -2
"""The token id the rules give a document's first position where the rows read do not hold it."""
START_TEXT = "⟨start⟩"


class Explanations(NamedTuple):
    """Each latent's best rule (index: latent)."""

    text: list[str]
    """The rule, readable; "no simple rule" under ``MIN_F1``; "too few firings to judge" under ``MIN_FIRINGS``
    on either half; "" for a latent that never fires."""
    f1: torch.Tensor
    """[dict_size] detection F1 of the rule on the scoring half (NaN for a latent that never fires or is too
    rare to judge)."""
    tokens: list[list[int]]
    """The token ids the rule names at the firing position ([] for a context rule)."""

    def f1_text(self, latent: int, digits: int = 2) -> str:
        """The latent's detection F1 as text (``f1_text``)."""
        return f1_text(float(self.f1[latent]), digits)

    def described(self, latent: int) -> str:
        """The latent's rule with its detection F1 (``described``)."""
        return described(self.text[latent], float(self.f1[latent]))


def f1_text(f1: float, digits: int = 2) -> str:
    """A detection F1 as text, "" where there is none (NaN: a latent that never fires or is too rare to judge)."""
    return "" if f1 != f1 else f"{f1:.{digits}f}"


def described(text: str, f1: float) -> str:
    """A rule with its detection F1 in brackets where it has one."""
    return f"{text} (F1 {f1_text(f1)})" if f1 == f1 else text


class TokenFeatures(NamedTuple):
    """The rule features of held-out tokens: for each kind, (token index, feature id) pairs."""

    half: torch.Tensor
    """int64 [n] 0 for the fitting half (even sequences), 1 for the scoring half."""
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """kind -> (token index [p], ascending; feature id [p])."""
    names: dict[str, torch.Tensor]
    """kind -> [n_features, width] the token ids each feature stands for (the rule's phrase, then its token)."""


def token_features(store: ActivationStore, rows: np.ndarray, half: torch.Tensor | None = None) -> TokenFeatures:
    """The features of the store ``rows`` (ascending) for every rule kind; ``half`` (int64 [n]) says which
    rows fit the rules (0) and which score them (1), by default the even and the odd sequences."""
    ids = store.token_ids(rows)
    seq, pos = store.positions(rows)
    n = len(rows)
    index = torch.arange(n)

    def back(k: int) -> torch.Tensor:
        """The token id k positions before each row: ``START`` where that is the document's first position and
        not among the rows, -1 where it is another position not among them."""
        before = (index - k).clamp(min=0)
        same = (seq[before] == seq) & (pos[before] == pos - k) & (index >= k)
        return torch.where(same, ids[before], torch.where((pos == k) & (ids >= 0), START, -1))

    prev1, prev2 = back(1), back(2)
    pairs, names = {}, {}
    for kind, columns in (("token", [ids]), ("after", [prev1, ids]), ("after phrase", [prev2, prev1, ids])):
        stacked = torch.stack(columns, 1)
        keep = (stacked != -1).all(1)
        unique, feature = torch.unique(stacked[keep], dim=0, return_inverse=True)
        pairs[kind], names[kind] = (index[keep], feature), unique
    earlier = torch.stack([back(k) for k in range(1, WINDOW + 1)], 1)  # [n, WINDOW]
    token, context = index[:, None].expand_as(earlier)[earlier != -1], earlier[earlier != -1]
    vocab = max(int(ids.max()) + 1, 1) - START  # a store without token ids (-1) has no rules
    distinct = torch.unique(token * vocab + context - START)  # each context token once per token
    unique, feature = torch.unique(distinct % vocab + START, return_inverse=True)
    pairs["context"], names["context"] = (distinct // vocab, feature), unique[:, None]
    return TokenFeatures(seq % 2 if half is None else half, pairs, names)


def _decoder(tokenizer):
    """Token ids -> text: the tokenizer's, else the ids themselves (a store without models); ``START`` (first
    where it is) as ``START_TEXT``."""
    decode = tokenizer.decode if tokenizer else lambda ids: " ".join(map(str, ids))
    return lambda ids: START_TEXT * (ids[:1] == [START]) + decode([i for i in ids if i != START])


def _weights(encoded: Encoded) -> torch.Tensor:
    """[nnz] each firing's activation over its latent's largest on the held-out tokens."""
    largest = torch.zeros(encoded.dict_size).scatter_reduce(0, encoded.latent, encoded.value, "amax")
    return encoded.value / largest[encoded.latent]


def _join(encoded: Encoded, features: TokenFeatures, kind: str, half: int) -> torch.Tensor:
    """[m, 3] for each (latent, feature) that meet on ``half``: key latent · n_features + feature, the firings
    of the latent on tokens with the feature, and their summed weight (``_weights``); keys ascending."""
    token, feature = features.pairs[kind]  # token ascending
    per_token = torch.bincount(token, minlength=encoded.n_tokens)
    starts = torch.cumsum(per_token, 0) - per_token
    on_half = features.half[encoded.token] == half
    firing_token, firing_latent = encoded.token[on_half], encoded.latent[on_half]
    repeats = per_token[firing_token]
    within = torch.arange(int(repeats.sum())) - torch.repeat_interleave(torch.cumsum(repeats, 0) - repeats, repeats)
    at = torch.repeat_interleave(starts[firing_token], repeats) + within
    keys = torch.repeat_interleave(firing_latent, repeats) * len(features.names[kind]) + feature[at]
    keys, where, count = torch.unique(keys, return_inverse=True, return_counts=True)
    weight = torch.zeros(len(keys), dtype=torch.float64).index_add(
        0, where, torch.repeat_interleave(_weights(encoded)[on_half], repeats).double()
    )
    return torch.stack([keys.double(), count.double(), weight], 1)


def _sizes(encoded: Encoded, features: TokenFeatures, kind: str, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of ``half`` each feature covers [n_features], and each latent's summed firing weight on it."""
    token, feature = features.pairs[kind]
    covers = torch.bincount(feature[features.half[token] == half], minlength=len(features.names[kind]))
    on_half = features.half[encoded.token] == half
    weight = torch.zeros(encoded.dict_size, dtype=torch.float64)
    return covers.double(), weight.index_add(0, encoded.latent[on_half], _weights(encoded)[on_half].double())


def _f1(hits: torch.Tensor, covered: torch.Tensor, weight: torch.Tensor, fires: torch.Tensor) -> torch.Tensor:
    """F1 of a rule from its precision (firings among the tokens it covers) and its recall weighted by
    activation (its firings' weight over all the latent's)."""
    precision, recall = hits / covered.clamp(min=1), weight / fires.clamp(min=1e-12)
    return (2 * precision * recall / (precision + recall).clamp(min=1e-12)).float()


def fit_rules(encoded: Encoded, features: TokenFeatures, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each latent's best rule of one kind on the fitting half: its items as keys (latent · n_features +
    feature, int64 [m]) and the fitting F1 per latent [dict_size]. A ``token`` rule takes the best of the
    first items, up to ``MAX_TOKENS``, of the latent's features by their own F1; the other kinds take the
    feature of the best F1. By F1, not precision: on real text a rare token the latent fires on once is precise
    and says nothing, while a frequent one it fires on in some contexts (``:`` in a glossary's headwords) is
    what it stands for."""
    n_features = len(features.names[kind])
    covers, fires = _sizes(encoded, features, kind, 0)
    met = _join(encoded, features, kind, 0)
    keys = met[:, 0].long()
    latent = keys // n_features
    alone = _f1(met[:, 1], covers[keys % n_features], met[:, 2], fires[latent])  # each feature as a rule
    order = torch.argsort(alone, descending=True, stable=True)
    order = order[torch.argsort(latent[order], stable=True)]  # by latent, then by the feature's own F1
    keys, latent = keys[order], latent[order]
    sums = torch.stack([met[order, 1], covers[keys % n_features], met[order, 2]])  # hits, covered, weight
    place = torch.arange(len(keys)) - torch.searchsorted(latent, latent)  # place in the latent's run
    limit = MAX_TOKENS if kind == "token" else 1
    so_far = sums.clone()  # over the run's first items up to here
    for back in range(1, limit):
        behind = (place >= back).nonzero().squeeze(1)
        so_far[:, behind] += sums[:, behind - back]
    f1 = torch.where(place < limit, _f1(*so_far, fires[latent]), 0.0)
    best = torch.zeros(encoded.dict_size).scatter_reduce(0, latent, f1, "amax")
    last = torch.full((encoded.dict_size,), len(keys)).scatter_reduce(  # the first place reaching the best F1
        0, latent, torch.where((f1 == best[latent]) & (f1 > 0), place, len(keys)), "amin"
    )
    return keys[place <= last[latent]], best


def score_rules(encoded: Encoded, features: TokenFeatures, kind: str, keys: torch.Tensor) -> torch.Tensor:
    """[dict_size] the detection F1 on the scoring half of each latent's rule (its items ``keys``)."""
    n_features = len(features.names[kind])
    covers, fires = _sizes(encoded, features, kind, 1)
    met = _join(encoded, features, kind, 1)
    found = torch.zeros(len(keys), 2, dtype=torch.float64)
    if len(met):
        at = torch.searchsorted(met[:, 0].long(), keys).clamp(max=len(met) - 1)
        found = torch.where((met[at, 0].long() == keys)[:, None], met[at, 1:], 0.0)
    latent = keys // n_features
    total = torch.zeros(3, encoded.dict_size, dtype=torch.float64)
    for i, values in enumerate((found[:, 0], covers[keys % n_features], found[:, 1])):
        total[i].index_add_(0, latent, values)
    return _f1(*total, fires)


def explain(
    encoded: Encoded, store: ActivationStore, tokenizer=None, fit: Encoded | None = None, max_pairs: int = 1 << 25
) -> Explanations:
    """Every live latent's best rule (``KINDS``; the simpler kind on a tie) by F1 on the tokens of ``fit`` (the
    latents on training rows, before ``encoded``'s in the store), with its detection F1 on the held-out tokens
    ``encoded`` read; without ``fit``, fitted on the even held-out sequences and scored on the odd ones.
    ``tokenizer`` writes the tokens (else their ids). Latents are taken in groups whose firings, each joined to
    its token's context features, number at most ``max_pairs`` (memory)."""
    half = None
    if fit is not None:
        half = torch.cat([torch.zeros(fit.n_tokens, dtype=torch.long), torch.ones(encoded.n_tokens, dtype=torch.long)])
        encoded = encoded._replace(
            rows=np.concatenate([fit.rows, encoded.rows]),
            token=torch.cat([fit.token, encoded.token + fit.n_tokens]),
            latent=torch.cat([fit.latent, encoded.latent]),
            value=torch.cat([fit.value, encoded.value]),
        )
    features = token_features(store, encoded.rows, half)
    best = torch.full((encoded.dict_size,), -1.0)
    scores = torch.full((encoded.dict_size,), float("nan"))
    chosen: dict[str, torch.Tensor] = {kind: [] for kind in KINDS}  # kind -> the chosen rules' keys
    pairs_per_firing = torch.bincount(features.pairs["context"][0], minlength=encoded.n_tokens)[encoded.token] + 3
    load = torch.zeros(encoded.dict_size).index_add(0, encoded.latent, pairs_per_firing.float())
    bounds = torch.searchsorted(
        torch.cumsum(load, 0), torch.arange(max_pairs, float(load.sum()) + max_pairs, max_pairs)
    )
    start = 0
    for stop in [*bounds.clamp(min=1).tolist(), encoded.dict_size]:
        if stop <= start:
            continue
        mine = (encoded.latent >= start) & (encoded.latent < stop)
        part = encoded._replace(token=encoded.token[mine], latent=encoded.latent[mine], value=encoded.value[mine])
        for kind in KINDS:
            keys, fit = fit_rules(part, features, kind)
            better = fit > best
            best = torch.where(better, fit, best)
            keys = keys[better[keys // len(features.names[kind])]]
            scores = torch.where(better, score_rules(part, features, kind, keys), scores)
            chosen[kind].append(keys)
        start = stop
    decode = _decoder(tokenizer)
    live = torch.bincount(encoded.latent, minlength=encoded.dict_size) > 0
    rules: dict[int, tuple[str, list]] = {}
    for kind in KINDS:  # a later kind's rule replaced an earlier one only where it was better
        names = features.names[kind]
        keys = torch.cat(chosen[kind])
        for latent, item in zip((keys // len(names)).tolist(), names[keys % len(names)].tolist()):
            if latent not in rules or rules[latent][0] != kind:
                rules[latent] = (kind, [])
            rules[latent][1].append(item)
    halves = features.half[encoded.token]
    fitting, scoring = (torch.bincount(encoded.latent[halves == h], minlength=encoded.dict_size) for h in (0, 1))
    rare = live & ((fitting < MIN_FIRINGS) | (scoring < MIN_FIRINGS))
    text, tokens = [""] * encoded.dict_size, [[] for _ in range(encoded.dict_size)]
    for latent in live.nonzero().squeeze(1).tolist():
        if rare[latent]:
            text[latent] = f"too few firings to judge ({fitting[latent]} fitting, {scoring[latent]} scoring)"
            continue
        if latent not in rules or not scores[latent] >= MIN_F1:
            text[latent] = "no simple rule"
            continue
        kind, items = rules[latent]
        if kind == "token":
            tokens[latent] = [item[0] for item in items]
            text[latent] = " ".join(f"«{decode([t])}»" for t in tokens[latent])
        elif kind == "context":
            text[latent] = f"within {WINDOW} tokens after «{decode(items[0])}»"
        else:
            tokens[latent] = [items[0][-1]]
            text[latent] = f'«{decode(items[0][-1:])}» after "{decode(items[0][:-1])}"'
    return Explanations(text, torch.where(live & ~rare, scores, float("nan")), tokens)


NEAR = 8
"""Held-out tokens within which two latents' strong firings count as one place."""
SPAN = 12
"""Tokens a group's phrase spans at most."""


class PhraseGroup(NamedTuple):
    """Latents of a ranking's top that fire in one recurring phrase or context (``phrase_groups``)."""

    phrase: str
    """The text they fire in: the commonest span, from the first to the last of their strong firings in a
    sequence, in which every latent of the group fires strongly, «»-quoted, where there is one of two to
    ``SPAN`` tokens; else their explanations."""
    latents: list[int]
    """In the ranking's order."""


def phrase_groups(
    encoded: Encoded, store: ActivationStore, latents: list[int], explanations: Explanations, tokenizer=None
) -> list[PhraseGroup]:
    """Group ``latents`` (a ranking's top, in order) by where they fire strongly (at half their largest
    held-out activation or more): two latents join when half the strong firings of each have a strong firing
    of the other within ``NEAR`` tokens of the same sequence (both ways, so that a latent firing everywhere
    joins nothing). Groups in the order of their best latent."""
    seq, _ = store.positions(encoded.rows)
    strong = _weights(encoded) >= 0.5
    places = [encoded.token[strong & (encoded.latent == latent)] for latent in latents]  # ascending

    def near(a: int, b: int) -> float:
        """The share of a's strong firings with a strong firing of b within NEAR tokens of the same sequence."""
        at = torch.searchsorted(places[b], places[a]).clamp(max=len(places[b]) - 1)
        hits = torch.zeros(len(places[a]), dtype=torch.bool)
        for i in (at, (at - 1).clamp(min=0)):
            hits |= ((places[b][i] - places[a]).abs() <= NEAR) & (seq[places[b][i]] == seq[places[a]])
        return hits.float().mean().item()

    pairs = [
        (a, b)
        for a, b in itertools.combinations(range(len(latents)), 2)
        if len(places[a]) and len(places[b]) and min(near(a, b), near(b, a)) >= 0.5
    ]
    found = connected_groups(
        torch.tensor(pairs, dtype=torch.long).view(-1, 2), torch.ones(len(latents), dtype=torch.bool)
    )
    grouped = {member for group in found for member in group}
    found += [[i] for i in range(len(latents)) if i not in grouped]
    decode = _decoder(tokenizer)
    ids = store.token_ids(encoded.rows)
    result = []
    for group in sorted(found, key=min):
        where = torch.cat([places[i] for i in group])
        who = torch.cat([torch.full((len(places[i]),), i) for i in group])
        where, order = where.sort()
        who = who[order]
        spans = Counter()  # span -> (latents of the group firing in it, sequences it is the group's span in)
        for sequence in seq[where].unique().tolist():
            inside = seq[where] == sequence
            first, last = int(where[inside][0]), int(where[inside][-1])
            if last - first < SPAN:
                span = tuple(ids[first : last + 1].tolist())
                spans[span] = (
                    max(spans[span][0] if span in spans else 0, len(who[inside].unique())),
                    (spans[span][1] if span in spans else 0) + 1,
                )
        rules = [explanations.text[latents[i]] for i in sorted(group)]
        rules = list(dict.fromkeys(rule for rule in rules if rule != "no simple rule")) or ["no simple rule"]
        span = max(spans, key=spans.get) if spans else ()
        phrase = f"«{decode(list(span))}»" if len(span) > 1 and spans[span][0] == len(group) else "; ".join(rules)
        result.append(PhraseGroup(phrase, [latents[i] for i in sorted(group)]))
    return result
