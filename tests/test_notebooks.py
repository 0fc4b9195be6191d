"""The notebooks run headless under papermill with small parameters, as a reviewer would run them."""

import dataclasses
import json
from pathlib import Path
from typing import Optional

import nbformat
import papermill
import pytest
import yaml

from crosscoder_utils import ActivationStore, CollectConfig, CrossCoder, CrossCoderConfig, OrganismConfig, TrainConfig
from crosscoder_utils import analysis as A
from crosscoder_utils.config import AnalysisConfig
from crosscoder_utils.hub import model_card
from crosscoder_utils.notebook import check_parameters, declared
from crosscoder_utils.organism import TINY
from crosscoder_utils.run import load_run
from crosscoder_utils.synthetic import SyntheticConfig, read_summary

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
INFERRED = {"d_model", "n_models"}  # CrossCoderConfig's shape comes from the store


def run_notebook(name, folder, **parameters):
    output = Path(folder) / f"{name}.ipynb"
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"),
        str(output),
        parameters=parameters,
        cwd=str(NOTEBOOKS.parent),
        progress_bar=False,
    )
    return nbformat.read(output, as_version=4)


def outputs_text(notebook):
    return "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        assert any("parameters" in c.metadata.get("tags", []) for c in notebook.cells), path
        assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), path


@pytest.fixture(scope="module")
def collected(organism, tmp_path_factory):
    out = tmp_path_factory.mktemp("notebooks")
    organism_nb = run_notebook("00_organism", out, out_dir=str(Path(organism.base).parent), **TINY)
    collect_nb = run_notebook(
        "01_collect",
        out,
        base_model=organism.base,
        finetuned_model=organism.finetuned,
        dataset=organism.corpus,
        layer=1,
        n_tokens=3000,
        seq_len=48,
        seqs_per_batch=16,
        store_dir=str(out / "store"),
    )
    return out, organism_nb, collect_nb


def test_organism_and_collect_notebooks(collected):
    out, organism_nb, collect_nb = collected
    assert "finetuned" in outputs_text(organism_nb) and "PROMPT" in outputs_text(organism_nb)
    store = ActivationStore(out / "store")
    assert len(store) == 3000 and store.meta["layer"] == 1
    assert "3,000 tokens of 2 models" in outputs_text(collect_nb)
    assert (out / "store/norms.png").stat().st_size > 10_000


def train_parameters(out):
    return dict(
        store_dir=str(out / "store"),
        run_dir=str(out / "run"),
        dict_size=128,
        variant="batchtopk",
        k=8,
        tokens_per_step=256,
        train_tokens=25_600,
        log_every=10,
        save_every=50,
        log_to="offline",
        n_shared_latents=8,
        n_dedicated=8,
        resample_every=20,
        norm_penalty=0.0,  # BatchTopK as published: k·B ordinary latents a batch (a penalty may keep fewer)
    )


@pytest.fixture(scope="module")
def trained(collected):
    out = collected[0]
    normalize_nb = run_notebook("02_normalize", out, store_dir=str(out / "store"), n_batches=4, tokens_per_batch=512)
    train_nb = run_notebook("03_train", out, **train_parameters(out))
    return out, normalize_nb, train_nb


def test_normalize_and_train_notebooks(trained):
    out, normalize_nb, _ = trained
    assert "-> factor" in outputs_text(normalize_nb)
    run_dir = out / "run"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 10 and metrics[-1]["l0_loss"] >= 8 and "threshold" in metrics[-1]  # 8 + active shared
    assert (run_dir / "crosscoder.safetensors").exists() and (run_dir / "raw/crosscoder.safetensors").exists()
    assert (run_dir / "training_curves.png").stat().st_size > 10_000
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_analyze_notebook_leads_with_the_verdict(trained, organism):
    out = trained[0]
    analyze_nb = run_notebook(
        "04_analyze",
        out,
        run_dir=str(out / "run"),
        n_top=5,
        n_eval_sequences=8,
    )
    analysis = out / "run/analysis"
    for figure in ("difference_map", "relative_norms", "decoder_cosines", "frequencies"):
        assert (analysis / f"{figure}.png").stat().st_size > 10_000
    rows = (analysis / "latents.csv").read_text().splitlines()
    assert rows[0].split(",")[:6] == [
        "latent",
        "kind",
        "frequency",
        "relative_norm",
        "decoder_cosine",
        "difference_score",
    ]
    summary = A.read_summary(analysis / "summary.json")
    health = summary["dictionary health"]
    assert len(rows) - 1 == 128 == sum(summary["live latents by kind"].values()) + health["dead"]
    assert (
        health["effective_size"]
        == 128 - health["dead"] - health["latents_in_duplicate_groups"] + health["duplicate_groups"]
    )
    assert summary["verdict"].startswith("The fine-tune's predictions differ most inside ")
    assert " The top 5 latents of the ranking are " in summary["verdict"]
    assert 0 < summary["loss recovered, base"] <= 1.01 and 0 < summary["loss recovered, finetuned"] <= 1.01
    text = outputs_text(analyze_nb)
    assert text.index("predictions differ most") < text.index("precision")  # the verdict comes first


def test_the_model_card_says_what_the_crosscoder_reads(trained):
    card = model_card(load_run(trained[0] / "run"), "owner/name")
    _, front, body = card.split("---\n", 2)
    metadata = yaml.safe_load(front)
    assert metadata["library_name"] == "crosscoder_utils" and "crosscoder" in metadata["tags"]
    assert "base_model" not in metadata  # local model directories are not Hub ids
    assert (
        "| site | resid_post, layer 1 (d_model 64) |" in body and "| dictionary | batchtopk, 128 latents, k 8 |" in body
    )
    assert 'CrossCoder.load("owner/name")' in body
    assert all(f"`{name}`" in body for name in ("explained_variance_A", "explained_variance_B", "l0_loss", "loss"))


def test_a_crosscoder_loaded_with_its_card_knows_what_it_reads(trained, tmp_path):
    run = load_run(trained[0] / "run")
    run.raw.save(tmp_path)
    (tmp_path / "README.md").write_text(model_card(run, "owner/name"))
    provenance = CrossCoder.load(tmp_path).provenance
    meta = run.store.meta
    assert provenance["models"] == meta["models"] and (provenance["site"], provenance["layer"]) == ("resid_post", 1)
    assert provenance["d_model"] == 64 and provenance["units"] == "raw"


def test_running_train_again_reuses_the_finished_run(trained):
    out = trained[0]
    written = (out / "run/crosscoder.safetensors").stat().st_mtime_ns
    again = run_notebook("03_train", out / "again", **train_parameters(out))
    assert (out / "run/crosscoder.safetensors").stat().st_mtime_ns == written
    assert "final: step 100" in outputs_text(again)


GROUND_TRUTH = dict(
    d_model=32,
    n_shared=60,
    n_exclusive=20,
    n_tokens=40_000,
    preset="relu",
    overrides={"dict_size": 160, "tokens_per_step": 512},
)


@pytest.fixture(scope="module")
def ground_truth_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ground_truth")
    return out, run_notebook("05_ground_truth", out, run_dir=str(out / "gt"), **GROUND_TRUTH)


def test_running_ground_truth_again_reuses_its_store_and_run(ground_truth_run):
    out = ground_truth_run[0]
    written = {p: p.stat().st_mtime_ns for p in (out / "gt").rglob("*.safetensors")}
    run_notebook("05_ground_truth", out / "again", run_dir=str(out / "gt"), **GROUND_TRUTH)
    assert written and {p: p.stat().st_mtime_ns for p in (out / "gt").rglob("*.safetensors")} == written


def test_ground_truth_notebook(ground_truth_run):
    out, notebook = ground_truth_run
    run_dir = out / "gt"
    summary = read_summary(run_dir / "summary.json")
    assert set(summary["recovered"]) == {"shared", "base-only", "finetuned-only"}
    assert all(0 <= v <= 1 for v in summary["classified"].values())
    assert (run_dir / "relative_norms_by_truth.png").stat().st_size > 10_000
    assert "false exclusives" in outputs_text(notebook)


def test_a_misspelt_parameter_is_refused_with_the_names_it_may_mean(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match=r"unknown parameters: l1_coef \(did you mean l1_coeff"):
        run_notebook("03_train", tmp_path, l1_coef=5.0, run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_parameter_of_the_wrong_type_is_refused_naming_it(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match=r"parameter dict_size must be int, got 'abc'"):
        run_notebook("03_train", tmp_path, dict_size="abc", run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_parameters_are_coerced_to_their_declared_types():
    namespace = {  # as papermill leaves it: the parameters cell, its injected cell (-p n_batches 2e5 is a float)
        "In": [
            "",
            "n_batches: int = 100\nratio: float = 0.5\nname: Optional[str] = None\n",
            "# Parameters\nn_batches = 2e5\nratio = 1\nname = None\n",
        ],
        "n_batches": 2e5,
        "ratio": 1,
        "name": None,
    }
    check_parameters(namespace)
    assert namespace["n_batches"] == 200_000 and type(namespace["n_batches"]) is int
    assert namespace["ratio"] == 1.0 and type(namespace["ratio"]) is float and namespace["name"] is None


def test_every_config_field_is_a_notebook_parameter():
    fields = {
        "01_collect": CollectConfig,
        "03_train": (TrainConfig, CrossCoderConfig, CollectConfig),
        "00_organism": OrganismConfig,
        "04_analyze": AnalysisConfig,
        "05_ground_truth": SyntheticConfig,
    }
    for name, configs in fields.items():
        cell = next(
            c for c in nbformat.read(NOTEBOOKS / f"{name}.ipynb", 4).cells if "parameters" in c.metadata.get("tags", [])
        )
        params = declared(cell.source)
        for config in configs if isinstance(configs, tuple) else (configs,):
            missing = {f.name for f in dataclasses.fields(config)} - set(params) - INFERRED
            assert not missing, (name, config.__name__, missing)
        assert all(annotation for annotation in params.values()), name  # typed, so --help-notebook lists them


def test_papermill_reads_every_parameter_with_its_type():
    """A line papermill cannot parse is left out of --help-notebook (it logs and goes on)."""
    for path in NOTEBOOKS.glob("*.ipynb"):
        cell = next(c for c in nbformat.read(path, 4).cells if "parameters" in c.metadata.get("tags", []))
        inspected = papermill.inspect_notebook(str(path))
        assert set(inspected) == set(declared(cell.source)), path
        assert all(p["inferred_type_name"] not in ("None", "") for p in inspected.values()), path


def test_a_parameter_in_two_notebooks_has_one_default():
    cells = {
        name: next(
            c for c in nbformat.read(NOTEBOOKS / f"{name}.ipynb", 4).cells if "parameters" in c.metadata.get("tags", [])
        )
        for name in ("01_collect", "03_train")
    }
    values = {}
    for name, cell in cells.items():
        namespace = {"Optional": Optional}
        exec(cell.source, namespace)
        values[name] = namespace
    shared = (set(values["01_collect"]) & set(values["03_train"])) - {"Optional", "__builtins__", "__annotations__"}
    assert {"layer", "n_tokens", "dataset"} <= shared
    assert {k: values["01_collect"][k] for k in shared} == {k: values["03_train"][k] for k in shared}
