"""`pip install .` (not editable) gives the whole package: every module, the dashboard's site files, the
training entry point, and the pins of requirements.txt as its dependencies. The wheel is built offline
(setuptools from this environment) and installed into a folder of its own, never into this environment."""

import email
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = "crosscoder_utils"

IMPORT_ALL = f"""
import importlib, json, pkgutil, sys
import {PACKAGE}
names = [{PACKAGE!r}] + [m.name for m in pkgutil.walk_packages({PACKAGE}.__path__, {PACKAGE!r} + ".")]
print(json.dumps({{name: importlib.import_module(name).__file__ for name in names}}))
"""


def source_modules() -> set[str]:
    """The package's modules in this checkout: each .py file of a folder with an __init__.py, up to the package."""
    names = set()
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if all((ROOT.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
            names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` builds, from a copy of the working tree as a clone would have it (tracked and
    untracked, not ignored, files): a build in the checkout would leave build/ behind, whose stale files the next
    wheel would include."""
    source = tmp_path_factory.mktemp("source")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out)]
    subprocess.run([*pip, str(source)], capture_output=True, check=True)
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a folder of its own (this environment is left as it is)."""
    target = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "--target"]
    subprocess.run([*pip, str(target), str(wheel)], capture_output=True, check=True)
    return target


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Python with the installed copy first on its path, from a folder outside the repository."""
    assert not cwd.resolve().is_relative_to(ROOT.resolve())
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_installed_copy_has_and_imports_every_module(site, tmp_path):
    result = run_installed(site, tmp_path, "-c", IMPORT_ALL)
    assert result.returncode == 0, result.stderr[-3000:]
    files = json.loads(result.stdout.splitlines()[-1])
    assert set(files) == source_modules()
    assert all(Path(file).resolve().is_relative_to(site.resolve()) for file in files.values()), files


def test_installed_copy_has_the_dashboard_site_files(site):
    files = lambda package: sorted(p.relative_to(package) for p in (package / "site").glob("*") if p.is_file())
    assert files(ROOT / PACKAGE)
    assert files(site / PACKAGE) == files(ROOT / PACKAGE)


def test_installed_training_entry_point_runs(site, tmp_path):
    """The module torchrun starts (docs/distributed.md): `torchrun ... -m crosscoder_utils.train RUN_DIR ...`."""
    result = run_installed(site, tmp_path, "-m", f"{PACKAGE}.train", "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"usage: python -m {PACKAGE}.train" in result.stdout


def test_wheel_requires_the_pins_of_requirements_txt(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        requires = email.message_from_bytes(archive.read(metadata)).get_all("Requires-Dist") or []
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    pins = [line for line in lines if line]
    assert all("==" in pin for pin in pins), pins
    assert sorted(requires) == sorted(pins)
