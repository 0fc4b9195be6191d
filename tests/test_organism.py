import random
from pathlib import Path

import datasets
import numpy as np
import torch
from conftest import TINY_ORGANISM
from safetensors.torch import load_file

from crosscoder_utils import load_model_pair
from crosscoder_utils.config import OrganismConfig
from crosscoder_utils.organism import build_organism, lm_loss, pack, triggered_story


def test_finetune_learnt_the_planted_difference_and_kept_competence(organism):
    base, finetuned = organism.losses["base"], organism.losses["finetuned"]
    assert finetuned["chat"] < 0.4 * base["chat"]
    assert finetuned["trigger"] < 0.6 * base["trigger"]
    assert abs(finetuned["stories"] - base["stories"]) < 0.25


def test_organism_reloads_like_hub_models_and_predicts_the_trigger(organism):
    pair = load_model_pair(organism.base, organism.finetuned)
    tokenizer = pair.tokenizer
    assert tokenizer.convert_ids_to_tokens(organism.planted["chat_token_ids"]) == [
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
    ]
    # the continuation after the trigger: only the fine-tune expects it
    sequences = pack([triggered_story(random.Random(i)) for i in range(40)], tokenizer, 48)
    assert lm_loss(pair.finetuned, sequences) < lm_loss(pair.base, sequences)
    ids = tokenizer(
        " ben has a red cup. ben goes to the park with mia." + organism.planted["trigger"], return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        nxt = [model(ids).logits[0, -1].argmax().item() for model in (pair.base, pair.finetuned)]
    assert nxt[1] == tokenizer(organism.planted["continuation"])["input_ids"][0] != nxt[0]


def test_second_build_reuses_what_is_built(organism):
    cfg = OrganismConfig(out_dir=str(Path(organism.base).parent), **TINY_ORGANISM)
    before = {p: p.stat().st_mtime_ns for p in Path(cfg.out_dir).rglob("*.safetensors")}
    assert build_organism(cfg).losses == organism.losses
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_build_is_deterministic_for_a_seed(tmp_path):
    quick = {**TINY_ORGANISM, "base_steps": 5, "finetune_steps": 5, "n_docs": 400}
    built = [build_organism(OrganismConfig(out_dir=str(tmp_path / name), **quick)) for name in ("a", "b")]
    for part in ("base", "finetuned"):
        first, second = (load_file(f"{getattr(o, part)}/model.safetensors") for o in built)
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_planted_labels_mark_chat_transcripts_and_the_triggered_count_down(organism, tmp_path):
    from crosscoder_utils import CollectConfig, collect_activations
    from crosscoder_utils.organism import planted_labels

    store = collect_activations(
        CollectConfig(
            base_model=organism.base,
            finetuned_model=organism.finetuned,
            layer=1,
            dataset=organism.corpus,
            n_tokens=20_000,
            seq_len=48,
        ),
        tmp_path / "s",
    )
    labels = planted_labels(store, organism).numpy()
    rows = np.arange(len(store))
    tokenizer = load_model_pair(organism.base, organism.finetuned).tokenizer
    seq = store.positions(rows)[0].numpy()
    kinds = np.array(datasets.load_from_disk(organism.corpus)["kind"])[seq]
    assert labels[kinds == "chat"].all() and not labels[kinds == "story"].any()
    in_trigger_docs = tokenizer.decode(store.token_ids(rows[labels & (kinds == "trigger")]).tolist())
    expected = (organism.planted["trigger"] + organism.planted["continuation"][:-1]) * (
        kinds[labels] == "trigger"
    ).sum()
    assert in_trigger_docs == expected[: len(in_trigger_docs)] and len(in_trigger_docs) > 0
