"""The notebooks run headless under papermill with small parameters, as a reviewer would run them."""

import dataclasses
import json
from pathlib import Path
from typing import Optional

import nbformat
import papermill
import pytest
import yaml
from conftest import SMALL

from crosscoder_utils import ActivationStore, CollectConfig, CrossCoder, CrossCoderConfig, OrganismConfig, TrainConfig
from crosscoder_utils import analysis as A
from crosscoder_utils.config import AnalysisConfig
from crosscoder_utils.hub import model_card
from crosscoder_utils.notebook import check_parameters, declared
from crosscoder_utils.run import load_run
from crosscoder_utils.synthetic import SyntheticConfig, read_summary

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
INFERRED = {"d_model", "n_models"}  # CrossCoderConfig's shape comes from the store


def run_notebook(name, folder, cwd=NOTEBOOKS.parent, **parameters):
    """Notebook ``name`` of the repository at ``cwd`` run with ``parameters``, its report into ``folder``."""
    output = Path(folder) / f"{name}.ipynb"
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(Path(cwd) / "notebooks" / f"{name}.ipynb"),
        str(output),
        parameters=parameters,
        cwd=str(cwd),
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


RUN = "outputs/runs/organism-relu"  # the demo's run (03's default run_dir), BatchTopK at SMALL's settings


def report(root: Path, name: str):
    return nbformat.read(root / f"outputs/{name}.ipynb", as_version=4)


def test_organism_and_collect_notebooks(demo):
    assert "finetuned" in outputs_text(report(demo, "00_organism")) and "PROMPT" in outputs_text(
        report(demo, "00_organism")
    )
    store = ActivationStore(demo / "outputs/activations/organism")
    assert len(store) == 3000 and store.meta["layer"] == 1
    assert "3,000 tokens of 2 models" in outputs_text(report(demo, "01_collect"))
    assert (demo / "outputs/activations/organism/norms.png").stat().st_size > 10_000


def test_normalize_and_train_notebooks(demo):
    assert "-> factor" in outputs_text(report(demo, "02_normalize"))
    run_dir = demo / RUN
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 10 and metrics[-1]["l0_loss"] >= 8 and "threshold" in metrics[-1]  # 8 + active shared
    assert (run_dir / "crosscoder.safetensors").exists() and (run_dir / "raw/crosscoder.safetensors").exists()
    assert (run_dir / "training_curves.png").stat().st_size > 10_000
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_analyze_notebook_leads_with_the_verdict(demo):
    analysis = demo / RUN / "analysis"
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
    text = outputs_text(report(demo, "04_analyze"))
    assert text.index("predictions differ most") < text.index("precision")  # the verdict comes first


@pytest.fixture
def demo_run(demo, monkeypatch, tmp_path):
    """The demo's run, its relative paths read as the clone's (they are recorded relative to the repository), from
    another folder (a relative path must not be found where the tests run from)."""
    monkeypatch.setattr("crosscoder_utils.files.REPO", demo)
    monkeypatch.chdir(tmp_path)
    return load_run(demo / RUN)


def test_the_model_card_says_what_the_crosscoder_reads(demo_run):
    card = model_card(demo_run, "owner/name")
    _, front, body = card.split("---\n", 2)
    metadata = yaml.safe_load(front)
    assert metadata["library_name"] == "crosscoder_utils" and "crosscoder" in metadata["tags"]
    assert "base_model" not in metadata  # local model directories are not Hub ids
    assert (
        "| site | resid_post, layer 1 (d_model 64) |" in body and "| dictionary | batchtopk, 128 latents, k 8 |" in body
    )
    assert 'CrossCoder.load("owner/name")' in body
    assert all(f"`{name}`" in body for name in ("explained_variance_A", "explained_variance_B", "l0_loss", "loss"))


def test_a_crosscoder_loaded_with_its_card_knows_what_it_reads(demo_run, tmp_path):
    demo_run.raw.save(tmp_path)
    (tmp_path / "README.md").write_text(model_card(demo_run, "owner/name"))
    provenance = CrossCoder.load(tmp_path).provenance
    meta = demo_run.store.meta
    assert provenance["models"] == meta["models"] and (provenance["site"], provenance["layer"]) == ("resid_post", 1)
    assert provenance["d_model"] == 64 and provenance["units"] == "raw"


def run_again(demo: Path, name: str, folder: Path, monkeypatch):
    """The demo's notebook ``name`` run again in the clone (its package), with the demo's parameters, its report
    into ``folder``."""
    monkeypatch.setenv("PYTHONPATH", str(demo))
    return run_notebook(name, folder, cwd=demo, **SMALL[name])


def test_running_train_again_reuses_the_finished_run(demo, tmp_path, monkeypatch):
    written = (demo / RUN / "crosscoder.safetensors").stat().st_mtime_ns
    again = run_again(demo, "03_train", tmp_path, monkeypatch)
    assert (demo / RUN / "crosscoder.safetensors").stat().st_mtime_ns == written
    assert "read back, not trained again" in outputs_text(again) and "final: step 100" in outputs_text(again)


def test_running_ground_truth_again_reuses_its_store_and_run(demo, tmp_path, monkeypatch):
    run_dir = demo / "outputs/ground_truth/relu"  # 05's default run_dir
    written = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.safetensors")}
    run_again(demo, "05_ground_truth", tmp_path, monkeypatch)
    assert written and {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.safetensors")} == written


def test_ground_truth_notebook(demo):
    run_dir = demo / "outputs/ground_truth/relu"
    summary = read_summary(run_dir / "summary.json")
    assert set(summary["recovered"]) == {"shared", "base-only", "finetuned-only"}
    assert all(0 <= v <= 1 for v in summary["classified"].values())
    assert (run_dir / "relative_norms_by_truth.png").stat().st_size > 10_000
    assert "false exclusives" in outputs_text(report(demo, "05_ground_truth"))


def test_a_misspelt_parameter_is_refused_with_the_names_it_may_mean(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match=r"unknown parameters: l1_coef \(did you mean l1_coeff"):
        run_notebook("03_train", tmp_path, l1_coef=5.0, run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_parameter_of_the_wrong_type_is_refused_naming_it():
    namespace = {  # as papermill leaves it after -p dict_size abc (refused in the notebook like a misspelt name)
        "In": ["", "dict_size: int = 192\n", "# Parameters\ndict_size = 'abc'\n"],
        "dict_size": "abc",
    }
    with pytest.raises(TypeError, match=r"parameter dict_size must be int, got 'abc'"):
        check_parameters(namespace)


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
