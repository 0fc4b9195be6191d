"""The notebooks run headless under papermill with small parameters, as a reviewer would run them."""
from pathlib import Path

import nbformat
import papermill
import pytest
from conftest import TINY_ORGANISM

from crosscoder_utils import ActivationStore

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


def run_notebook(name, folder, **parameters):
    output = Path(folder) / f"{name}.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(output), parameters=parameters,
                               cwd=str(NOTEBOOKS.parent), progress_bar=False)
    return nbformat.read(output, as_version=4)


def outputs_text(notebook):
    return "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        assert any("parameters" in c.metadata.get("tags", []) for c in notebook.cells), path
        assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), path


@pytest.fixture(scope="module")
def collected(organism, tmp_path_factory):
    out = tmp_path_factory.mktemp("notebooks")
    organism_nb = run_notebook("00_organism", out, out_dir=str(Path(organism.base).parent), **TINY_ORGANISM)
    collect_nb = run_notebook("01_collect", out, base_model=organism.base, finetuned_model=organism.finetuned,
                              dataset=organism.corpus, layer=1, n_tokens=3000, seq_len=48, batch_size=16,
                              store_dir=str(out / "store"))
    return out, organism_nb, collect_nb


def test_organism_and_collect_notebooks(collected):
    out, organism_nb, collect_nb = collected
    assert "finetuned" in outputs_text(organism_nb) and "PROMPT" in outputs_text(organism_nb)
    store = ActivationStore(out / "store")
    assert len(store) == 3000 and store.meta["layer"] == 1
    assert "3,000 tokens of 2 models" in outputs_text(collect_nb)
    assert (out / "store/norms.png").stat().st_size > 10_000
