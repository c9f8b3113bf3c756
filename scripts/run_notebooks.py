"""`make run`: execute every notebook in order, headless, into outputs/ and print a summary.

Usage: python scripts/run_notebooks.py [NOTEBOOK_PREFIX ...]   (e.g. 02 03 to run only those)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from helpers import config  # noqa: E402


def run(path: Path, out_dir: Path) -> float:
    """Execute one notebook (cwd = notebooks/) and save the executed copy; return seconds taken."""
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(notebook, timeout=None, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    finally:
        nbformat.write(notebook, out_dir / path.name)
    return time.perf_counter() - start


def main(prefixes: list[str]) -> int:
    out_dir = config.output_dir() / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        notebooks = [nb for nb in notebooks if nb.name.startswith(tuple(prefixes))]
    print(f"profile {config.profile()}, model {config.model_name()}, outputs in {config.output_dir()}")
    for path in notebooks:
        print(f"running {path.name} ...", flush=True)
        try:
            seconds = run(path, out_dir)
        except CellExecutionError as error:
            print(f"FAILED in {path.name}; the executed copy with the error is in {out_dir / path.name}\n{error}")
            return 1
        print(f"  done in {seconds:.1f} s", flush=True)
    print("\nmetrics.json:")
    print(json.dumps(config.read_metrics(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
