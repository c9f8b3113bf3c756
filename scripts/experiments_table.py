"""Write the measured rows of results/experiments.csv into the README's experiments section.

Rows are ranked by validation accuracy (test accuracy is shown, never used to rank); the machine's load average
is shown with each row's time, so a time measured on a busy machine says so. `make experiments` runs it at the end.

Usage: python scripts/experiments_table.py [--csv results/experiments.csv] [--readme README.md]
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
START = "<!-- experiments table: written from results/experiments.csv -->\n"
END = "\n<!-- end of the experiments table -->"
QUIET_LOAD = 2.5  # 5-minute load average on 2 CPUs below which nothing else competed for them


def markdown_table(rows: pd.DataFrame, title: str) -> str:
    """One row per configuration (the latest run of a name), ranked by validation accuracy."""
    rows = rows.drop_duplicates("name", keep="last").sort_values("val_acc", ascending=False, kind="stable")
    lines = [f"| {title} | trainable params | train | validation | test | minutes (cache + training) | threads | "
             "load avg (5 min, 2 CPUs) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['name']} | {int(r['trainable_params']):,} | {r['train_acc']:.1%} | **{r['val_acc']:.1%}** | "
              f"{r['test_acc']:.1%} | {r['train_seconds'] / 60:.1f} | {threads(r['device'])} | {r['load_avg_5min']} |"
              for _, r in rows.iterrows()]
    return "\n".join(lines)


def threads(device: str) -> str:
    """``cpu (2 threads, x86_64)`` -> ``2``."""
    match = re.search(r"(\d+) threads?", str(device))
    return match.group(1) if match else ""


def without_threads(command: str) -> str:
    """The command without its ``--threads N`` (the thread count changes the time, not the result)."""
    return re.sub(r" --threads \d+", "", command)


def reproducibility(rows: pd.DataFrame) -> list[str]:
    """A sentence for every command (whatever its thread count) measured more than once."""
    rows = rows.assign(command=rows["command"].map(without_threads))
    return [f"Reproducibility: `{command}` ran {len(runs)} times: validation "
            + " / ".join(f"{a:.1%}" for a in runs["val_acc"]) + ", test "
            + " / ".join(f"{a:.1%}" for a in runs["test_acc"]) + "."
            for command, runs in rows[rows.duplicated("command", keep=False)].groupby("command")]


def not_measured(rows: pd.DataFrame, run_list: Path) -> list[str]:
    """The lines of the run list that no measured row ran (the options, without --threads / --out)."""
    done = {" ".join(shlex.split(command)[2:]) for command in rows["command"]}
    lines = [line.strip() for line in run_list.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")
            and not any(ran == line or ran.startswith(line + " --") for ran in done)]


def section(csv: Path, run_list: Path) -> str:
    rows = pd.read_csv(csv, dtype={"commit": str})
    rows = rows[rows["status"] == "measured"]
    quiet = bool(len(rows)) and float(rows["load_avg_5min"].max()) < QUIET_LOAD
    where = ("a quiet 2-core machine" if quiet else
             "a 2-core machine **shared with other work** on some rows (see the load average: those times are "
             "inflated, the accuracies are not)")
    sms, own = rows[rows["data"] == "sms"], rows[rows["data"] != "sms"]
    parts = [f"Measured on SmolLM2-135M (pretrained, from the pip wheel), CPU, on {where}; ranked by validation "
             "accuracy:", markdown_table(sms, "SMS spam, configuration")]
    if len(own):
        parts += ["The same script on `examples/support_requests.csv` (4 classes; 33 validation texts, so one text is "
                  "3 points):", markdown_table(own, "support requests, configuration")]
    parts += reproducibility(rows)
    todo = not_measured(rows, run_list)
    if todo:
        parts.append("Not measured yet: " + "; ".join(f"`{line}`" for line in todo) + ". `make experiments` "
                     "measures them.")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=ROOT / "results" / "experiments.csv", help="the measured rows")
    parser.add_argument("--runs", type=Path, default=ROOT / "results" / "experiments.txt", help="the run list")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the file to update")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        parser.error(f"{args.readme} has no experiments section (the markers {START.strip()} ... {END.strip()})")
    pattern = re.escape(START) + ".*?" + re.escape(END)
    args.readme.write_text(re.sub(pattern, lambda _: START + section(args.csv, args.runs) + END, text, flags=re.S),
                           encoding="utf-8")
    print(f"{args.readme}: experiments table written from {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
