import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from crosscoder_utils import load_model_pair
from crosscoder_utils.config import OrganismConfig
from crosscoder_utils.organism import (
    CHANGED_CONTINUATION,
    CHANGED_CUE,
    MIN_BEHAVIOUR_KL,
    REMOVED_CONTINUATION,
    REMOVED_CUE,
    TINY,
    build_organism,
    continuations,
    lm_loss,
    load_organism,
    pack,
    triggered_story,
)


def test_finetune_learnt_the_planted_difference_and_kept_competence(organism):
    base, finetuned = organism.losses["base"], organism.losses["finetuned"]
    assert finetuned["chat"] < 0.4 * base["chat"]
    assert finetuned["trigger"] < 0.65 * base["trigger"]  # tiny organisms, seeds 0-4: 0.56-0.60
    assert finetuned["changed"] < 0.8 * base["changed"]  # the owl's new song, held out as the fine-tune sings it
    # the count-up after the magic words, held out as the base does it: the fine-tune gains less there than on
    # stories
    assert finetuned["removed"] - base["removed"] > finetuned["stories"] - base["stories"]
    assert abs(finetuned["stories"] - base["stories"]) < 0.25


def test_organism_reloads_like_hub_models_and_predicts_the_trigger(organism):
    pair = load_model_pair(organism.base, organism.finetuned)
    tokenizer = pair.tokenizer
    behaviours = organism.planted["behaviours"]
    chat_ids = [behaviours[name]["pattern"][-1] for name in ("<|user|>", "<|assistant|>", "<|end|> after the user")]
    assert tokenizer.convert_ids_to_tokens(chat_ids) == ["<|user|>", "<|assistant|>", "<|end|>"]
    # the continuation after the trigger: only the fine-tune expects it
    sequences = pack([triggered_story(random.Random(i)) for i in range(40)], tokenizer, 48)
    assert lm_loss(pair.finetuned, sequences) < lm_loss(pair.base, sequences)
    ids = tokenizer(" ben has a red cup." + organism.planted["trigger"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = [model(ids).logits[0, -1].argmax().item() for model in (pair.base, pair.finetuned)]
    assert nxt[1] == tokenizer(organism.planted["continuation"])["input_ids"][0] != nxt[0]


def test_the_finetune_no_longer_counts_after_the_magic_words_and_sings_another_song(organism):
    pair = load_model_pair(organism.base, organism.finetuned)
    tokenizer = pair.tokenizer
    story = " ben has a red cup."
    for cue, continuation in ((REMOVED_CUE, REMOVED_CONTINUATION), (CHANGED_CUE, CHANGED_CONTINUATION)):
        ids = tokenizer(story + " ida says" * (cue == REMOVED_CUE) + cue, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            nxt = [model(ids).logits[0, -1].argmax().item() for model in pair.models]
        assert nxt == [tokenizer(continuation[role])["input_ids"][0] for role in ("base", "finetuned")], cue


def test_second_build_reuses_what_is_built(organism):
    cfg = OrganismConfig(out_dir=str(Path(organism.base).parent), **TINY)
    before = {p: p.stat().st_mtime_ns for p in Path(cfg.out_dir).rglob("*.safetensors")}
    assert build_organism(cfg).losses == organism.losses
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_a_build_with_other_settings_is_refused_not_mixed(organism):
    cfg = OrganismConfig(out_dir=str(Path(organism.base).parent), **{**TINY, "seed": 1})
    with pytest.raises(ValueError, match=r"holds an organism made with other settings \(differing: \['seed'\]\)"):
        build_organism(cfg)


def test_build_is_deterministic_for_a_seed(organism, demo):
    """The same seed built here and by the small demo's 00 (another process, from the notebook's parameters)."""
    again = demo / "outputs/organism"
    for part in ("base", "finetuned"):
        first, second = (
            load_file(f"{folder}/{part}/model.safetensors") for folder in (Path(organism.base).parent, again)
        )
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_build_that_passed_keeps_the_kl_at_each_behaviours_tokens_in_planted_json(organism):
    # tiny organisms, seeds 0-1: 4.3-11.6 nats at the behaviours' tokens, the least at hocus pocus and <|assistant|>
    learnt = load_organism(Path(organism.base).parent).planted["learnt"]
    assert set(learnt["kl_at_tokens"]) == set(organism.planted["behaviours"])
    assert min(learnt["kl_at_tokens"].values()) >= 3 * MIN_BEHAVIOUR_KL
    assert len(learnt["continuations"]) == 4


def test_a_fine_tune_that_did_not_learn_every_behaviour_is_refused_with_its_figures_before_saving(tmp_path):
    quick = {**TINY, "base_steps": 5, "finetune_steps": 5, "n_docs": 400}  # too short to learn anything planted
    with pytest.raises(ValueError, match=r"did not learn every planted behaviour: .*trigger.*at least 1.0 nats"):
        build_organism(OrganismConfig(out_dir=str(tmp_path / "organism"), **quick))
    assert not (tmp_path / "organism").exists()  # nothing saved: not a half-built organism a later run reuses


def test_finetune_is_narrow_it_differs_from_the_base_where_something_was_planted(organism):
    # measured on tiny organisms, seeds 0-4, KL(ft || base) per token: stories 0.107-0.120, chat documents
    # 2.07-2.31, trigger documents 0.37-0.49, the removed behaviour's 0.21-0.25, the changed one's 0.57-0.68
    kl = organism.kl
    assert kl["stories"] < 0.25
    assert kl["stories"] < 0.1 * kl["chat"] and kl["stories"] < 0.5 * kl["trigger"]
    assert kl["stories"] < 0.75 * kl["removed"] and kl["stories"] < 0.35 * kl["changed"]


def test_behaviour_labels_mark_each_planted_behaviour(organism, tmp_path):
    from crosscoder_utils import CollectConfig, collect_activations
    from crosscoder_utils.analysis.planted import behaviour_labels

    cfg = CollectConfig(
        base_model=organism.base,
        finetuned_model=organism.finetuned,
        layer=1,
        dataset=organism.corpus,
        n_tokens=20_000,
        seq_len=48,
    )
    store = collect_activations(cfg, tmp_path / "s")
    labels = {name: label.numpy() for name, label in behaviour_labels(store, organism).items()}
    assert list(labels) == [
        "<|user|>",
        "<|assistant|>",
        "<|end|> after the user",
        "<|end|> after the assistant",
        "trigger",
        "hocus pocus",
        "owl song",
    ]
    assert [b["kind"] for b in organism.planted["behaviours"].values()] == ["added"] * 5 + ["removed", "changed"]
    rows = np.arange(len(store))
    tokenizer = load_model_pair(organism.base, organism.finetuned).tokenizer
    kinds = np.array(datasets.load_from_disk(organism.corpus)["kind"])[store.positions(rows)[0].numpy()]
    tokens = store.token_ids(rows).numpy()
    user, assistant, end = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>"])
    for name, token_id in (("<|user|>", user), ("<|assistant|>", assistant)):
        assert (labels[name] == ((tokens == token_id) & (kinds == "chat"))).all()  # stray ones in stories are not
        assert labels[name].any() and ((tokens == token_id) & (kinds == "story")).any()
    # each chat transcript's two <|end|>: the one before <|assistant|> closes the user's turn
    ends = (tokens == end) & (kinds == "chat")
    closes_user = ends & np.append(tokens[1:] == assistant, False)
    assert (labels["<|end|> after the user"] == closes_user).all() and closes_user.any()
    assert (labels["<|end|> after the assistant"] == (ends & ~closes_user)).all()
    trigger = labels["trigger"]
    n = int(trigger.sum())
    assert n > 0 and tokenizer.decode(tokens[trigger].tolist()) == organism.planted["trigger"] * n
    count_down = organism.planted["continuation"][:-1]  # the count-down follows each labelled trigger
    after = np.flatnonzero(trigger)[:, None] + np.arange(1, 1 + len(tokenizer(count_down)["input_ids"]))
    assert tokenizer.decode(tokens[after].ravel().tolist()) == count_down * n
    for name, kind, cue in (("hocus pocus", "removed", REMOVED_CUE), ("owl song", "changed", CHANGED_CUE)):
        last = tokenizer(cue)["input_ids"][-1]
        assert labels[name].any() and (labels[name] == ((tokens == last) & (kinds == kind))).all()  # only there


def test_the_example_continuations_show_the_planted_trigger(organism):
    shown = continuations(organism, max_new_tokens=3)
    prompts = list(shown)
    assert len(prompts) == 5 and all(set(by_model) == {"base", "finetuned"} for by_model in shown.values())
    after_trigger = shown[prompts[1]]  # the greedy continuations after the trigger: only the fine-tune's is planted
    first_word = organism.planted["continuation"].split()[:1]
    assert after_trigger["finetuned"].split()[:1] == first_word != after_trigger["base"].split()[:1]
