"""What every notebook does first: paths relative to the repository root, and the parameters papermill
injected checked against the notebook's parameters cell; and the progress bar every long loop shows."""

from __future__ import annotations

import ast
import difflib
import os
import typing
from pathlib import Path

from tqdm.auto import tqdm


def setup_notebook() -> None:
    """Make paths relative to the repository root, whichever folder a notebook was started from."""
    root = Path(__file__).resolve().parents[1]
    if Path.cwd().resolve() == root / "notebooks":
        os.chdir(root)


def progress(iterable=None, disable: bool = False, **kwargs) -> tqdm:
    """tqdm.auto's progress bar, off when the environment sets ``TQDM_DISABLE`` (as ``make demo`` does): tqdm's
    notebook bar ignores that variable, and a report saved with it shows a widget stuck at 0 %."""
    return tqdm(iterable, disable=disable or bool(os.environ.get("TQDM_DISABLE")), **kwargs)


TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict, "Optional": typing.Optional}
"""The types a parameters cell may annotate with (``Optional[...]`` rather than ``... | None``, which papermill's
parameter inspection cannot read)."""


def declared(source: str) -> dict[str, str | None]:
    """name -> type annotation (as written; None when the assignment has none) of the names a cell assigns."""
    names = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = ast.unparse(node.annotation)
        elif isinstance(node, ast.Assign):
            names.update({target.id: None for target in node.targets if isinstance(target, ast.Name)})
    return names


def coerce(name: str, value, annotation: str | None):
    """``value`` as the annotated type: an integral float for an int (papermill reads ``2e5`` as a float), an
    int for a float, a number or a string where a union allows it; anything else is refused naming ``name``."""
    if annotation is None:
        return value
    kind = eval(annotation, {"__builtins__": {}}, TYPES)  # the parameters cell's own annotations
    options = typing.get_args(kind) if typing.get_origin(kind) is typing.Union else (kind,)
    if type(value) in options or (value is None and type(None) in options):
        return value
    if int in options and isinstance(value, float) and value.is_integer():
        return int(value)
    if float in options and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if list in options and isinstance(value, tuple):
        return list(value)
    raise TypeError(f"parameter {name} must be {annotation}, got {value!r} ({type(value).__name__})")


def check_parameters(namespace: dict) -> None:
    """Refuse parameters papermill injected that the notebook's parameters cell does not declare (naming the
    closest declared ones), and coerce each injected value to its declared type in ``namespace``.

    papermill runs its injected cell (which opens with ``# Parameters``) right after the cell tagged
    ``parameters``; both sources are in IPython's input history ``In``. A notebook run by hand has no
    injected cell, and nothing is checked."""
    history = namespace.get("In", [])
    at = next((i for i, source in enumerate(history) if source.lstrip().startswith("# Parameters")), None)
    if at is None:
        return
    known, given = declared(history[at - 1]), declared(history[at])
    unknown = sorted(set(given) - set(known))
    if unknown:
        hints = [
            f"{name} (did you mean {', '.join(difflib.get_close_matches(name, known, 3)) or '?'})" for name in unknown
        ]
        raise NameError(f"unknown parameters: {'; '.join(hints)}. This notebook's parameters: {', '.join(known)}")
    for name in given:
        namespace[name] = coerce(name, namespace[name], known[name])
