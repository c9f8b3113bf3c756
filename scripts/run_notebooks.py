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


def run(path: Path, out_dir: Path, timeout: int | None = None) -> float:
    """Execute one notebook (cwd = notebooks/) and save the executed copy; return seconds taken.

    ``timeout``: seconds any one cell may take (None: no limit).
    """
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
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
    metrics = config.read_metrics()
    print("\nmetrics.json:", json.dumps(metrics, sort_keys=True)[:2000])
    print("\nsummary:")
    for line in summary(metrics):
        print("  " + line)
    return 0


def summary(metrics: dict) -> list[str]:
    """A few human lines from metrics.json (only what was recorded)."""
    lines = []
    d = metrics.get("data", {})
    if {"rows", "balanced", "split"} <= d.keys():
        b, s = d["balanced"], d["split"]
        lines.append(f"data: {d['rows']:,} rows -> {b['spam']}/{b['ham']} spam/ham -> "
                     f"{s['train']:,}/{s['validation']}/{s['test']} train/validation/test")
    for key in ("classifier", "lora", "qlora", "smollm2"):
        acc = metrics.get(key, {}).get("accuracy")
        if acc:
            seconds = metrics[key].get("train_seconds")
            lines.append(f"{key}: test accuracy {acc['test']:.2%}" + (f" (trained in {seconds:.0f} s)" if seconds else ""))
    if "baseline" in metrics:
        lines.append(f"baseline (bag of tokens): test accuracy {metrics['baseline']['accuracy']['test']:.2%}")
    return lines


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
