"""A researcher's own pair, not the organism: two tiny transformers saved as model directories and a store from
a plain text dataset. 04's analysis and 06's comparison run on it with no labels, and never read an organism."""

import csv
import json
import shutil

import datasets
import pytest
import torch
from conftest import TEXTS
from test_notebooks import outputs_text, run_notebook

from crosscoder_utils import (
    ActivationStore,
    CollectConfig,
    CrossCoderConfig,
    TrainConfig,
    collect_activations,
    estimate_norm_factors,
    methods,
    train_crosscoder,
)
from crosscoder_utils import analysis as A
from crosscoder_utils.collect import store_models


@pytest.fixture(scope="module")
def own_run(make_model, tmp_path_factory):
    """A relu crosscoder trained on a store of two different tiny Llamas on a plain dataset directory, laid out as a
    recipe's build_pair.py writes one: corpus/ beside a build.json of its own (not an organism's)."""
    folder = tmp_path_factory.mktemp("own_pair")
    datasets.Dataset.from_dict({"text": TEXTS * 4}).save_to_disk(str(folder / "corpus"))
    (folder / "build.json").write_text(json.dumps({"settings": {"seed": 0}}))
    cfg = CollectConfig(
        base_model=make_model("llama", 32, 0),
        finetuned_model=make_model("llama", 32, 1),
        dataset=str(folder / "corpus"),
        layer=1,
        n_tokens=4000,
        seq_len=48,
        val_fraction=0.25,
    )
    store = collect_activations(cfg, folder / "store")
    estimate_norm_factors(store, 4, 512)
    train = TrainConfig(tokens_per_step=256, train_tokens=20_000, log_to="none", log_every=20)
    train_crosscoder(train, store, folder / "run", CrossCoderConfig(dict_size=64, l1_coeff=1.0))
    return folder


def test_analysis_of_another_pair_reads_no_labels(own_run):
    analysis = A.analyse(own_run / "run", device="cpu")
    assert analysis.organism is None and analysis.matches is None and analysis.planted_kinds is None
    assert analysis.divergence is not None and len(analysis.divergence.rows) == analysis.encoded.n_tokens
    assert len(analysis.tables["finetuned"].order) > 0


def test_the_per_token_kl_is_computed_once_per_store_rows_and_read_back_after(own_run, tmp_path):
    shutil.copytree(own_run / "store", tmp_path / "store", ignore=shutil.ignore_patterns("token_kl"))
    store = ActivationStore(tmp_path / "store")
    pair = store_models(store, "cpu")
    first = A.token_divergence(pair, store, torch.ones(2), max_tokens=300)
    assert [p.name for p in (tmp_path / "store/token_kl").iterdir()] == [
        f"model1_rows{first.rows[0]}-{first.rows[-1]}.safetensors"
    ]
    again = A.token_divergence(pair, store, torch.ones(2), max_tokens=300)
    assert torch.equal(again.kl, first.kl) and again.seconds == first.seconds  # read back: its first computation's
    other = A.token_divergence(pair, store, torch.ones(2), max_tokens=200)  # other rows: computed
    assert other.seconds != first.seconds and torch.allclose(other.kl, first.kl[:200], atol=1e-6)


def test_methods_agree_where_their_top_tokens_are_mostly_the_same():
    make = lambda method, rank, rows: methods.Candidate(method, rank, rank, "", 1.0, [], rows)
    a, b, c, d = make("x", 1, [1, 2, 3, 4]), make("y", 2, [2, 3, 4, 9]), make("y", 1, [1, 2, 3, 5]), make("z", 1, [7])
    # a and c overlap by 3/4 and b by 3/4; b and c, one method's, are linked only through a; d shares nothing
    assert methods.agreement([a, b, c, d]) == [[a, b, c]]
    assert methods.agreement([a, b, c, d], min_overlap=0.8) == []


def test_a_chain_of_half_overlaps_is_not_one_place():
    make = lambda method, rank, rows: methods.Candidate(method, rank, rank, "", 1.0, [], rows)
    a, b, c = make("x", 1, [1, 2, 3, 4]), make("y", 1, [3, 4, 5, 6]), make("z", 1, [5, 6, 7, 8])
    e = make("x", 2, [5, 6, 7, 9])
    # b shares half its top with a and half with c, which shares nothing with a: a and b are one place, and c
    # agrees with e (3/4), not through b
    assert methods.agreement([a, e, b, c]) == [[a, b], [e, c]]


def test_a_dataset_that_changed_since_collection_is_refused_naming_it(own_run, tmp_path):
    # a copy of the store whose meta.json names a dataset with other text, as a Hub dataset that moved on would
    shutil.copytree(own_run / "store", tmp_path / "store")
    datasets.Dataset.from_dict({"text": [t.upper() for t in TEXTS * 4]}).save_to_disk(str(tmp_path / "texts"))
    meta = json.loads((tmp_path / "store/meta.json").read_text())
    meta["settings"]["dataset"] = str(tmp_path / "texts")
    (tmp_path / "store/meta.json").write_text(json.dumps(meta))
    store = ActivationStore(tmp_path / "store")
    with pytest.raises(ValueError, match=r"texts'.*tokenised again does not match the store.*row"):
        A.token_divergence(store_models(store, "cpu"), store, torch.ones(2))


@pytest.fixture(scope="module")
def analyze_report(own_run):
    """04 run headless on the pair, its top 5 patched and steered: the report's outputs as text."""
    return outputs_text(
        run_notebook("04_analyze", own_run / "reports", run_dir=str(own_run / "run"), n_top=5, n_eval_sequences=4)
    )


def test_04_patches_its_top_on_another_pair_and_says_so_in_the_verdict_and_latents_csv(own_run, analyze_report):
    assert "Patching (the finetuned's layers on the base's activation" in analyze_report
    with open(own_run / "run/analysis/latents.csv") as file:
        rows = list(csv.DictReader(file))
    assert all(row["kl_closed_where_fires_finetuned"] for row in rows[:5])  # the top 5, in ranking order
    assert not any(row["kl_closed_where_fires_finetuned"] for row in rows[5:])
    summary = json.loads((own_run / "run/analysis/summary.json").read_text())
    assert "KL closed by every latent (finetuned's layers on the base's activation)" in summary


def test_04_and_06_run_headless_on_another_pair_and_show_every_method_unscored(own_run, analyze_report):
    run_dir, out = str(own_run / "run"), own_run / "reports"
    assert "vs base:" in analyze_report and "not the organism" in analyze_report
    compare = outputs_text(run_notebook("06_compare", out, run_dir=run_dir, out_dir=str(out / "compare"), n_top=5))
    assert "not the organism's store" in compare
    with open(out / "compare/candidates.csv") as file:
        rows = list(csv.DictReader(file))
    assert {row["method"] for row in rows} == {"crosscoder", "diff-SAE", "PCA of Δx", "ADL", "per-token KL", "‖Δx‖"}
    assert all(row["top_context"].count("«") == 1 for row in rows)  # every candidate has a context
    assert not (out / "compare/methods.csv").exists()  # nothing scored without labels
    assert (out / "compare/diff_sae/seed-0/run").is_dir() and not list(
        (out / "compare/diff_sae").glob("*/store")
    )  # the diff-SAE read Δx from the store, wrote none


def test_the_logit_lens_shows_one_list_where_both_models_read_the_same_tokens():
    decode = lambda ids: " ".join(map(str, ids))
    same = {"promoted": [[1, 2]], "suppressed": [[3, 4]]}
    lines = methods.logit_lens_lines({"base": same, "finetuned": same}, [1], decode)
    assert lines[:2] == [
        "base = finetuned   promoted at position 1: '1 2'",
        "base = finetuned suppressed at position 1: '3 4'",
    ]
    assert "the same lists for base and finetuned" in lines[2]
    other = {"promoted": [[1, 5]], "suppressed": [[3, 4]]}
    assert len(methods.logit_lens_lines({"base": same, "finetuned": other}, [1], decode)) == 4
