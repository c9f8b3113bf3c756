"""The pin file and environment.yml agree; notebooks are committed clean."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch", "nbconvert-core": "nbconvert"}  # conda-forge name -> PyPI name


def pip_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line).groups()
            pins[name.lower()] = version
    return pins


def conda_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "environment.yml").read_text().splitlines():
        match = re.fullmatch(r"\s*-\s+([A-Za-z0-9_.\-]+)\s*(==?)\s*([^\s#]+)\s*(#.*)?", line)
        if match and match.group(1) != "python":
            name = CONDA_NAMES.get(match.group(1).lower(), match.group(1).lower())
            pins[name] = match.group(3)
    return pins


def test_environment_yml_matches_requirements():
    assert pip_pins() == conda_pins(), "requirements.txt and environment.yml list different packages or versions"


def test_torch_is_pinned_exactly_and_installed():
    pin = pip_pins()["torch"]  # the pin file is the source of the version
    assert re.fullmatch(r"\d+\.\d+\.\d+", pin), f"torch=={pin}: pin a full version (a range can pull a CUDA build)"
    import torch

    assert torch.__version__.split("+")[0] == pin, f"installed torch {torch.__version__}, requirements.txt pins {pin}"


def test_every_imported_package_is_pinned():
    """The third-party packages helpers/ imports are pinned in requirements.txt (their import names are
    their PyPI names)."""
    import ast
    import sys

    imported = set()
    for path in (ROOT / "helpers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"helpers"}
    assert third_party - set(pip_pins()) == set(), "pin these in requirements.txt and environment.yml"


def test_notebooks_are_committed_without_outputs():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "solutions").glob("*.ipynb"))
    assert notebooks, "no notebooks found"
    for path in notebooks:
        cells = json.loads(path.read_text())["cells"]
        dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
        assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"
