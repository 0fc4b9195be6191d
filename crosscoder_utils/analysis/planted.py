"""Scoring against labelled tokens: the organism's planted behaviours as labels of a store's rows, the best
threshold cut of a score (``detection``, shared with the baselines of methods/), and each planted behaviour's
best latent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch

from ..organism import Organism, labelled_positions, load_organism
from .encoding import Encoded


class Detection(NamedTuple):
    """Per group (a latent, a candidate direction), its best cut of "score above a threshold" against labelled
    tokens: the F1 and, at that cut, the precision, the recall and the lowest score kept."""

    f1: torch.Tensor
    precision: torch.Tensor
    recall: torch.Tensor
    threshold: torch.Tensor


def detection(group: torch.Tensor, score: torch.Tensor, hit: torch.Tensor, n_groups: int, n_labelled: int) -> Detection:
    """The best cut of each group's scores against the labels, [n_groups] each. The entries are the tokens each
    group scores (a latent's firings, or every token for a dense score): ``group``, ``score`` and ``hit``
    (whether the entry's token is labelled) [entries]; ``n_labelled`` counts the labelled tokens in all, so a
    token a group does not score counts as below every threshold. Cuts fall between distinct scores only
    (tied tokens are never split); a group with no entry gets F1 0."""
    if not len(group):
        return Detection(*[torch.zeros(n_groups)] * 4)
    order = score.argsort(descending=True, stable=True)
    order = order[group[order].argsort(stable=True)]
    group, score, hit = group[order], score[order], hit[order].double()
    counts = torch.bincount(group, minlength=n_groups)
    first = torch.cumsum(counts, 0) - counts  # each group's first entry
    total = hit.cumsum(0)
    hits = total - (total - hit)[first[group]]  # labelled tokens among the group's entries so far
    kept = torch.arange(1, len(group) + 1, dtype=torch.float64) - first[group]
    f1 = 2 * hits / (kept + n_labelled)
    cut = torch.ones_like(hit, dtype=torch.bool)
    cut[:-1] = (score[:-1] != score[1:]) | (group[:-1] != group[1:])
    f1 = torch.where(cut, f1, -1.0)
    best = torch.full((n_groups,), -1.0, dtype=torch.float64).scatter_reduce(0, group, f1, "amax")
    at = torch.full((n_groups,), len(group)).scatter_reduce(  # the first entry reaching each group's best
        0, group, torch.where(f1 == best[group], torch.arange(len(group)), len(group)), "amin"
    )
    found = at < len(group)
    pick = lambda values: torch.where(found, values[at.clamp(max=len(group) - 1)], 0.0).float()
    return Detection(pick(f1), pick(hits / kept), pick(hits / max(n_labelled, 1)), pick(score.double()))


class BehaviourMatch(NamedTuple):
    """The latent that best picks out one labelled behaviour (its activation above a threshold vs the label,
    on a split)."""

    latent: int
    precision: float
    """Of the tokens where the latent's activation reaches ``threshold``, the fraction on the behaviour's."""
    recall: float
    """Of the behaviour's tokens, the fraction where the latent's activation reaches ``threshold``."""
    f1: float
    threshold: float
    """The activation that separates the behaviour's tokens best (the lowest one kept)."""
    n_tokens: int
    """The behaviour's tokens in the split."""
    f1_firing: float
    """The same latent's F1 where it fires at all (activation > 0): far below ``f1`` when it also fires weakly
    all over the text."""


def behaviour_hits(encoded: Encoded, labels: dict[str, torch.Tensor]):
    """For behaviours ``labels`` (name -> bool [len(store)]): firings of each latent on each behaviour's tokens
    [behaviours, dict_size], firings of each latent [dict_size], and each behaviour's token count."""
    on = torch.stack([labels[name][torch.from_numpy(encoded.rows)] for name in labels]).double()  # [behaviours, n]
    count = lambda weights=None: torch.bincount(encoded.latent, weights, minlength=encoded.dict_size).double()
    return torch.stack([count(label[encoded.token]) for label in on]), count(), on.sum(1)


def best_latents(encoded: Encoded, labels: dict[str, torch.Tensor]) -> dict[str, BehaviourMatch]:
    """For each behaviour (``labels``: name -> bool [len(store)]), the latent whose activation, above its best
    threshold (``detection``), has the best F1 against the behaviour's tokens: a latent that also fires weakly
    elsewhere still picks out the behaviour by its strong activations. Of latents tied at that F1 (a perfect
    detection often is), the one with the best F1 where it fires at all: a twin that also fires weakly all over
    the text (a sparsity artifact, which patching shows carries none of the change) loses to the latent that
    fires on the behaviour alone."""
    matches = {}
    hits, fires, counts = behaviour_hits(encoded, labels)
    for (name, label), on_hits, n_on in zip(labels.items(), hits, counts):
        on = label[torch.from_numpy(encoded.rows)]
        found = detection(encoded.latent, encoded.value, on[encoded.token], encoded.dict_size, int(on.sum()))
        f1_firing = 2 * on_hits / (fires + n_on).clamp(min=1)
        latent = int(torch.where(found.f1 == found.f1.max(), f1_firing, -1.0).argmax())
        f1, precision, recall, threshold = (float(values[latent]) for values in found)
        matches[name] = BehaviourMatch(
            latent, precision, recall, f1, threshold, int(on.sum()), float(f1_firing[latent])
        )
    return matches


def main_behaviours(encoded: Encoded, labels: dict[str, torch.Tensor], min_precision: float = 0.5) -> dict:
    """latent -> (behaviour, precision) for the latents that fire mostly (at least ``min_precision`` of their
    firings) on one behaviour's tokens."""
    hits, fired, _ = behaviour_hits(encoded, labels)
    precision = hits / fired.clamp(min=1)
    best, behaviour = precision.max(0)
    names = list(labels)
    return {i: (names[behaviour[i]], float(best[i])) for i in (best >= min_precision).nonzero().squeeze(1).tolist()}


EXPECTED_KINDS = {"added": ("finetuned-only", "changed"), "removed": ("base-only", "changed"), "changed": ("changed",)}
"""Planted kind (planted.json) -> the kinds of latent that carry it as planted: what the fine-tune added is in
the fine-tune alone or written differently there, what it removed is in the base alone or written
differently, and what it changed is written differently."""


def store_organism(store) -> Organism | None:
    """The organism whose corpus ``store`` was collected from, or None for any other store: a corpus directory
    named ``corpus`` beside an organism's ``build.json`` and ``planted.json``, as 00 writes them (a recipe's
    pair, with a corpus and a build.json of its own, is not one). Planted labels score a store only when this
    finds its organism, so a researcher's own pair never touches one."""
    if not store.collected_from_models:
        return None
    corpus = Path(str(store.meta["dataset"]["name"])).expanduser()
    if corpus.name != "corpus" or not all((corpus.parent / f).is_file() for f in ("planted.json", "build.json")):
        return None
    if "planted_kinds" not in json.loads((corpus.parent / "build.json").read_text()):
        return None
    return load_organism(corpus.parent)


def document_kinds(store, organism: Organism) -> np.ndarray:
    """str [documents]: the kind of each corpus document (story, chat, trigger, removed, changed), indexed by a
    store row's sequence index.

    The store must have been collected from the organism's corpus, whose documents are all non-empty, so
    a row's sequence index is its document's row in the corpus."""
    if Path(str(store.meta["dataset"]["name"])).resolve() != Path(organism.corpus).resolve():
        raise ValueError(
            f"the store was collected from {store.meta['dataset']['name']!r}, not the organism corpus "
            f"{organism.corpus!r}"
        )
    return np.array(datasets.load_from_disk(organism.corpus)["kind"])


def behaviour_labels(store, organism: Organism) -> dict[str, torch.Tensor]:
    """behaviour -> bool [len(store)]: the store's rows that carry each planted behaviour (planted.json)."""
    kinds = document_kinds(store, organism)
    rows = np.arange(len(store))
    seq = store.positions(rows)[0].numpy()
    tokens = store.token_ids(rows).numpy()
    in_kind = lambda behaviour: kinds[seq] == behaviour["document_kind"] if behaviour["document_kind"] else None
    return {
        name: torch.from_numpy(labelled_positions(tokens, seq, behaviour, in_kind(behaviour)))
        for name, behaviour in organism.planted["behaviours"].items()
    }
