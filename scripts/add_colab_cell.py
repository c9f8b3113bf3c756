"""Put the Google Colab setup cell first among the code cells of every notebook (idempotent).

The cell does nothing outside Colab (so nbval and local Jupyter run it harmlessly). On Colab it clones the course
into /content when the notebook was opened on its own (e.g. from GitHub), then calls ``helpers.colab.setup_colab``.
Run it again after changing the cell below: it updates the cell in place, and a second run changes nothing.

Usage: python scripts/add_colab_cell.py [NOTEBOOK ...]   (default: every notebooks/NN_*.ipynb)
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
CELL_ID = "colab-setup"
REPO_URL = "https://github.com/OWNER/llm-finetuning-course"  # the course's public repository: set before publishing
COLAB_DIR = "/content/llm-finetuning-course"
SOURCE = f"""\
import os, subprocess, sys  # Google Colab only: fetch the course, install what Colab lacks. Elsewhere: nothing.
if "google.colab" in sys.modules:
    course = "{COLAB_DIR}"
    if not os.path.isdir(course):
        subprocess.run(["git", "clone", "--depth=1", "{REPO_URL}", course], check=True)
    sys.path.insert(0, course); from helpers.colab import setup_colab; setup_colab()"""


def notebooks() -> list[Path]:
    """The course's notebooks, in order."""
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def first_code_cell(notebook: nbformat.NotebookNode) -> int | None:
    """Index of the first code cell, or None."""
    return next((i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"), None)


def has_current_cell(notebook: nbformat.NotebookNode) -> bool:
    """True when the first code cell is the Colab cell with today's source."""
    index = first_code_cell(notebook)
    return index is not None and notebook.cells[index].get("id") == CELL_ID and notebook.cells[index].source == SOURCE


def add_colab_cell(notebook: nbformat.NotebookNode) -> bool:
    """Insert or update the Colab cell in ``notebook``; return whether anything changed."""
    if has_current_cell(notebook):
        return False
    notebook.cells = [cell for cell in notebook.cells if cell.get("id") != CELL_ID]  # an older version, anywhere
    cell = nbformat.v4.new_code_cell(SOURCE, id=CELL_ID, metadata={"tags": [CELL_ID]})
    index = first_code_cell(notebook)
    notebook.cells.insert(len(notebook.cells) if index is None else index, cell)
    return True


def main(paths: list[str]) -> int:
    for path in [Path(p) for p in paths] or notebooks():
        notebook = nbformat.read(path, as_version=4)
        changed = add_colab_cell(notebook)
        if changed:
            nbformat.write(notebook, path)
        print(f"{path.name}: {'Colab cell written' if changed else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
