"""Explanations without an LLM: the rule search recovers rules planted on a real store's tokens, scores them on
held-out sequences, and groups latents by the phrase they fire in."""

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import collect_organism

from crosscoder_utils.analysis.encoding import Encoded
from crosscoder_utils.analysis.explanations import START_TEXT, WINDOW, explain, phrase_groups


@pytest.fixture(scope="module")
def store(organism, tmp_path_factory):
    return collect_organism(organism, tmp_path_factory.mktemp("explain"), 8000, 0.5)


def encoded_from(store, fires: list[torch.Tensor], split: str = "val") -> Encoded:
    """A split as a crosscoder whose latent i fires (activation 1-2) exactly where ``fires[i]``."""
    rows = np.asarray(store.split_range(split))
    token, latent = torch.stack(fires, 1).nonzero(as_tuple=True)
    value = 1 + torch.rand(len(token), generator=torch.Generator().manual_seed(0))
    empty = torch.zeros(len(fires), 2, store.meta["d_model"], dtype=torch.float64)
    return Encoded(
        rows, token, latent, value, len(fires), torch.zeros(2), torch.zeros(len(rows), 2), empty[:, 0, 0], empty, empty
    )


def held_out_tokens(store, split="val"):
    rows = np.asarray(store.split_range(split))
    ids = store.token_ids(rows)
    seq, pos = store.positions(rows)
    return ids, seq, pos


def test_the_rule_search_finds_each_kind_of_rule_and_no_rule_for_noise(store, tokenizer):
    ids, seq, pos = held_out_tokens(store)
    previous = torch.where((seq.roll(1) == seq) & (pos.roll(1) == pos - 1), ids.roll(1), -1)
    common = Counter(ids.tolist()).most_common()[0][0]
    # a token that follows several tokens, and its commonest one: the rule needs the token before it
    followed = Counter(zip(previous.tolist(), ids.tolist()))
    after, token = next(
        pair
        for pair, _ in followed.most_common()
        if pair[0] >= 0 and pair[1] != common and ids.eq(pair[1]).sum() > followed[pair]
    )
    opener = Counter(ids[pos == pos[pos > 0].min()].tolist()).most_common()[0][0]  # a token early in many sequences
    within = torch.zeros(len(ids), dtype=torch.bool)
    for i in (ids == opener).nonzero().squeeze(1).tolist():
        window = (seq == seq[i]) & (pos > pos[i]) & (pos <= pos[i] + WINDOW)
        within |= window
    noise = torch.rand(len(ids), generator=torch.Generator().manual_seed(1)) < 0.3
    fires = [ids == common, (ids == token) & (previous == after), within, noise]
    explanations = explain(encoded_from(store, fires), store, tokenizer)
    assert explanations.text[:3] == [
        f"«{tokenizer.decode([common])}»",
        f'«{tokenizer.decode([token])}» after "{tokenizer.decode([after])}"',
        f"within {WINDOW} tokens after «{tokenizer.decode([opener])}»",
    ]
    assert explanations.f1[:3].tolist() == [1.0, 1.0, 1.0] and explanations.tokens[:3] == [[common], [token], []]
    assert explanations.text[3] == "no simple rule" and explanations.f1[3] < 0.5


def test_a_token_that_opens_documents_is_named_at_the_start_where_it_is_common_elsewhere(store, tokenizer):
    ids, seq, pos = held_out_tokens(store)
    assert int(pos.min()) == 1  # BOS, position 0, is not stored
    elsewhere = Counter(ids[pos > 1].tolist())
    opener = max(set(ids[pos == 1].tolist()), key=lambda t: min(elsewhere[t], int((ids[pos == 1] == t).sum())))
    opens = (ids == opener) & (pos == 1)
    assert opens.sum() >= 10 and elsewhere[opener] >= opens.sum()  # a token rule covers twice the firings
    explanations = explain(encoded_from(store, [opens]), store, tokenizer)
    assert explanations.text == [f'«{tokenizer.decode([opener])}» after "{START_TEXT}"']
    assert explanations.f1.tolist() == [1.0]


def test_latents_firing_in_one_phrase_form_one_group_named_by_it(store, tokenizer):
    ids, seq, pos = held_out_tokens(store)
    previous = torch.where((seq.roll(1) == seq) & (pos.roll(1) == pos - 1), ids.roll(1), -1)
    (first, second), _ = Counter(zip(previous.tolist(), ids.tolist())).most_common()[0]
    pair_end = (ids == second) & (previous == first)
    pair_start = pair_end.roll(-1)
    without_pair = ~torch.isin(seq, seq[pair_end])  # sequences where the phrase never occurs
    lonely = without_pair & (torch.arange(len(ids)) % 3 == 0)
    encoded = encoded_from(store, [pair_start, lonely, pair_end])
    groups = phrase_groups(encoded, store, [0, 1, 2], explain(encoded, store, tokenizer), tokenizer)
    assert [group.latents for group in groups] == [[0, 2], [1]]
    assert groups[0].phrase == f"«{tokenizer.decode([first, second])}»"


def test_a_latent_too_rare_to_judge_says_so_rather_than_no_rule(store, tokenizer):
    ids, seq, _ = held_out_tokens(store)
    common = Counter(ids.tolist()).most_common()[0][0]
    rare = torch.zeros(len(ids), dtype=torch.bool)
    rare[(ids == common).nonzero().squeeze(1)[:3]] = True  # 3 firings of a token with a perfect rule elsewhere
    explanations = explain(encoded_from(store, [ids == common, rare]), store, tokenizer)
    assert explanations.text[0] == f"«{tokenizer.decode([common])}»"
    assert explanations.text[1].startswith("too few firings to judge (") and explanations.f1[1].isnan()


def test_rules_are_chosen_on_the_training_rows_and_scored_on_the_held_out_ones(store, tokenizer):
    train_ids = held_out_tokens(store, "train")[0]
    ids = held_out_tokens(store)[0]
    first, second = (token for token, _ in Counter(ids.tolist()).most_common(2))
    # latent 0 fires on `first` everywhere; latent 1 on `first` in training and on `second` held out
    fit = encoded_from(store, [train_ids == first, train_ids == first], "train")
    explanations = explain(encoded_from(store, [ids == first, ids == second]), store, tokenizer, fit)
    assert explanations.text == [f"«{tokenizer.decode([first])}»", "no simple rule"]
    assert explanations.f1[0] == 1.0 and explanations.f1[1] == 0.0


def test_a_frequent_token_the_latent_fires_on_in_some_contexts_beats_rare_tokens(store, tokenizer):
    """On real text a latent often fires on a common token in some of its contexts and on a few rare tokens:
    precise, and saying little. The rule names the common token (items were once taken by precision, and such
    latents of a real fine-tune read "no simple rule")."""
    ids, seq, pos = held_out_tokens(store)
    counts = Counter(ids.tolist())
    common = counts.most_common()[0][0]
    in_both = set(ids[seq % 2 == 0].tolist()) & set(ids[seq % 2 == 1].tolist())  # seen when fitting and scoring
    rarest = sorted(in_both, key=counts.__getitem__)[:3]
    rare = torch.isin(ids, torch.tensor(rarest))  # precision 1, and a few of the latent's firings
    assert rare.sum() < 0.1 * (ids == common).sum()
    fires = ((ids == common) & (pos % 2 == 0)) | rare
    explanations = explain(encoded_from(store, [fires]), store, tokenizer)
    assert explanations.tokens[0][0] == common and explanations.f1[0] >= 0.5  # first, then what adds to its F1
