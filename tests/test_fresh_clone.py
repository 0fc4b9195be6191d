"""A newcomer's first steps on a fresh clone: `make demo` (small settings, `PARAMS`), then every papermill example
of the README, as written, after it. Each step's reuse of what it built before is tested where the step is
(test_organism: the organism; test_notebooks: 03 and 05 run again; test_train: a run; test_methods: the seeds'
crosscoders and the diff-SAE)."""

import re
import shlex
from pathlib import Path

import nbformat
import yaml
from conftest import SMALL, run_in
from test_notebooks import outputs_text

from crosscoder_utils import methods
from crosscoder_utils.analysis import read_summary
from crosscoder_utils.notebook import check_parameters

EXAMPLE_SIZE = {  # appended to the README's examples, by notebook
    "01_collect": {"n_tokens": 3000},
    "03_train": {
        "n_tokens": 3000,
        "dict_size": 128,
        "tokens_per_step": 256,
        "train_tokens": 25_600,
        "dead_tokens": 10_000,
    },
    "04_analyze": {"n_eval_sequences": 8, "n_patched": 4, "patch_documents": 8},
}


def readme_examples(readme: str) -> list[list[str]]:
    """The README's papermill commands, as argument lists (continuation lines joined)."""
    commands = re.findall(r"^\.venv/bin/papermill .*?(?<!\\)$", readme, re.S | re.M)
    return [shlex.split(command.replace("\\\n", " ")) for command in commands]


def test_make_demo_writes_every_report(demo):
    root = demo
    for notebook in SMALL:
        report = nbformat.read(root / f"outputs/{notebook}.ipynb", as_version=4)
        assert not any(o.get("output_type") == "error" for c in report.cells for o in c.get("outputs", []))
    assert (root / "outputs/runs/organism-relu/analysis/summary.json").exists()


def test_the_demos_reports_print_the_reading_of_their_own_numbers(demo):
    """06's count of the behaviours each method finds on every seed is that of its methods.csv, and 04's sentence
    over seeds that of its own table (summary.json keeps its rows)."""
    root = demo
    found: dict[str, dict[str, list[bool]]] = {}
    for row in methods.read_methods_csv(root / "outputs/compare/methods.csv"):
        if row["best_f1"] is not None:
            found.setdefault(row["method"], {}).setdefault(row["behaviour"], []).append(row["found"])
    compare_text = outputs_text(nbformat.read(root / "outputs/06_compare.ipynb", as_version=4))
    line = re.search(r"behaviours found on every training seed: (.*)", compare_text).group(1)
    for method, behaviours in found.items():
        every = sum(all(seeds) for seeds in behaviours.values())
        assert re.search(rf"{re.escape(method)} (\d+) of", line).group(1) == str(every), (method, line)
    assert found["crosscoder"] and all(len(f) == 2 for m in ("crosscoder", "diff-SAE") for f in found[m].values())
    summary = read_summary(root / "outputs/runs/organism-relu/analysis/summary.json")
    seeds = [value.split(",")[0] for key, value in summary.items() if key.endswith("found on seeds, F1")]
    analyze_text = outputs_text(nbformat.read(root / "outputs/04_analyze.ipynb", as_version=4))
    every = int(re.search(r"on every seed for (\d+) of (\d+) behaviours", analyze_text).group(1))
    assert seeds and every == seeds.count("2 of 2")


def test_make_demo_saves_reports_without_progress_widgets(demo):
    """A widget saved in a report shows a bar stuck at 0 % outside Jupyter; turning the bars off leaves no warning."""
    root = demo
    for notebook in SMALL:
        report = nbformat.read(root / f"outputs/{notebook}.ipynb", as_version=4)
        outputs = [o for c in report.cells for o in c.get("outputs", [])]
        assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), notebook
        assert "progress bars" not in outputs_text(report), notebook


def test_every_readme_example_runs_as_written_after_the_demo(demo):
    root = demo
    examples = readme_examples((root / "README.md").read_text())
    hub = lambda args: any("/" in a and not a.startswith(("notebooks/", "outputs/")) for a in args[1:])  # Hub ids
    local = [args for args in examples if not hub(args)]
    assert local, "the README has no example that runs offline"
    for args in local:
        sizes = EXAMPLE_SIZE.get(Path(args[1]).stem, {})
        run_in(args + [word for name, value in sizes.items() for word in ("-p", name, str(value))], root)
        assert (root / args[2]).exists() and args[2] != f"outputs/{Path(args[1]).name}"  # a report of its own


def test_every_readme_example_names_only_declared_parameters_of_their_types(clone):
    """Also those that need the Hub, which cannot run here: their parameters pass the notebook's own check."""
    root, _ = clone
    for args in readme_examples((root / "README.md").read_text()):
        cell = next(
            c for c in nbformat.read(root / args[1], as_version=4).cells if "parameters" in c.metadata.get("tags", [])
        )
        values = {args[i + 1]: yaml.safe_load(args[i + 2]) for i, a in enumerate(args) if a == "-p"}
        injected = "# Parameters\n" + "".join(f"{name} = {value!r}\n" for name, value in values.items())
        check_parameters({"In": ["", "".join(cell.source), injected], **values})
