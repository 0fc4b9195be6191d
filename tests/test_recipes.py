"""Every recipe's parameters are parameters its notebooks declare, of their declared types: a recipe that
names a parameter a notebook renamed fails here, not hours into a run on a GPU."""

from pathlib import Path

import nbformat
import pytest
import yaml

from crosscoder_utils.notebook import check_parameters

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*/*.yaml"))


def test_there_are_recipes():
    assert {path.parent.name for path in RECIPES} >= {"gemma2-2b"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_a_recipes_parameters_are_declared_with_their_types(path):
    notebook = ROOT / "notebooks" / f"{path.stem}.ipynb"
    assert notebook.exists(), f"{path} names no notebook"
    cell = next(c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    values = yaml.safe_load(path.read_text())
    injected = "# Parameters\n" + "".join(f"{name} = {value!r}\n" for name, value in values.items())
    check_parameters({"In": ["", "".join(cell.source), injected], **values})
