"""`make run`: execute the course's notebooks in order into outputs/, with progress, a summary and a report.

    make run                          every notebook, 01 to the last
    make run NOTEBOOKS="05 06"        only those, reusing what earlier notebooks prepared (also "05-07", "05-")
    make solutions                    the exercises' worked solutions (solutions/) into outputs/solutions/
    COURSE_VERBOSE=1 make run         every message of the kernels and cells (or: -v)
    python scripts/run_notebooks.py --help

While a notebook runs: its section, a bar over its cells, its own progress bars (training, caching) and the
time left where a measured time is known. Ctrl-C stops cleanly and saves the executed copy up to that cell.
At the end: a summary table, and outputs/index.html, the course report, which opens without a network.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from course_run import kernel, progress, report, summary  # noqa: E402  (scripts/ is on sys.path)
from helpers import config  # noqa: E402

NOTEBOOK_FILES = "[0-9][0-9]_*.ipynb"
PORTABLE_MODEL = "smollm2-135m"  # its weights come with pip: no model hub needed
DOWNLOAD_ERRORS = {"DownloadError", "URLError", "HTTPError", "ConnectionError", "ConnectTimeout", "ReadTimeout",
                   "TimeoutError", "gaierror"}
EXIT_FAILED, EXIT_INTERRUPTED = 1, 130
TRACEBACK_LINES = 15  # of a failed cell's traceback, in the terminal (the executed copy has all of it)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_notebooks.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings come from the environment (README, 'Settings'): COURSE_PROFILE, COURSE_MODEL, "
               "COURSE_OUTPUT_DIR, COURSE_VERBOSE, ...\nExit status: 0 done, 1 a notebook failed, 130 Ctrl-C.")
    parser.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                        help='which notebooks: a number ("05"), a name ("05_fine_tune_classifier"), a range '
                             '("04-06") or "05-" for 05 to the last; default: all, in order')
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything: the cells' output, every warning, the kernels' own messages "
                             "(same as COURSE_VERBOSE=1)")
    parser.add_argument("--list", action="store_true", help="list the notebooks and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: print the summary and rewrite outputs/index.html from what exists")
    parser.add_argument("--no-report", action="store_true", help="skip writing outputs/index.html")
    parser.add_argument("--solutions", action="store_true",
                        help="run the exercises' worked solutions (solutions/) instead, into outputs/solutions/ "
                             "(NOTEBOOK then picks solutions by number; no course report)")
    parser.add_argument("--source", type=Path, default=None, help=argparse.SUPPRESS)  # tests
    return parser.parse_args(argv)


def select(notebooks: list[Path], wanted: list[str]) -> list[Path]:
    """The notebooks ``wanted`` names (numbers, name prefixes, ranges), in course order; all when empty."""
    if not wanted:
        return notebooks
    chosen: set[Path] = set()
    for token in wanted:
        first, dash, last = token.partition("-")
        if dash and first.isdigit() and (last.isdigit() or not last):
            low, high = int(first), int(last) if last else 99
            matches = [path for path in notebooks if low <= int(path.name[:2]) <= high]
        else:
            prefix = token.zfill(2) if token.isdigit() else token
            matches = [path for path in notebooks if path.name.startswith(prefix)]
        if not matches:
            names = ", ".join(path.stem for path in notebooks)
            raise SystemExit(f"No notebook matches {token!r}. The notebooks are: {names}")
        chosen.update(matches)
    return [path for path in notebooks if path in chosen]


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def download_hint(model: str) -> str:
    """The way forward for the whole course when a download fails."""
    lines = ["A download failed (its own message is above)."]
    if model != PORTABLE_MODEL:
        lines += ["If this machine cannot reach the model hub, run the whole course with the model that comes "
                  "with pip:", f"      COURSE_MODEL={PORTABLE_MODEL} make run"]
    lines.append('For the data set or GPT-2\'s tokenizer, or to place files by hand, see "Working offline" in '
                 "README.md.")
    return "\n  ".join(lines)


def cell_position(notebook: nbformat.NotebookNode, cell_index: int | None) -> str:
    """``cell 3/8 ("Training")`` for a cell index."""
    headings = progress.section_headings(notebook)
    if cell_index not in headings:
        return "before its first cell"
    number = list(headings).index(cell_index) + 1
    return f"cell {number}/{len(headings)} ({headings[cell_index]})" if headings[cell_index] else \
        f"cell {number}/{len(headings)}"


def failure_text(path: Path, notebook: nbformat.NotebookNode, outcome: kernel.Outcome, copy: Path,
                 model: str) -> str:
    """What went wrong, in which cell, and what to do."""
    where = cell_position(notebook, outcome.cell_index)
    lines = [f"{path.stem} failed at {where} after {progress.duration(outcome.seconds)}:", ""]
    if outcome.ename in DOWNLOAD_ERRORS:
        lines += [f"  {outcome.ename}: {outcome.evalue}".replace("\n", "\n  "), "", "  " + download_hint(model)]
    else:
        tail = [line for line in outcome.traceback.splitlines() if line.strip()][-TRACEBACK_LINES:]
        lines += ["  " + line for line in (tail or [f"{outcome.ename}: {outcome.evalue}"])]
    lines += ["", f"The executed copy, with the whole error: {shown(copy)}",
              f'After fixing it, continue from there: make run NOTEBOOKS="{path.name[:2]}-"']
    return "\n".join(lines)


def interrupted_text(path: Path, notebook: nbformat.NotebookNode, outcome: kernel.Outcome, copy: Path) -> str:
    return (f"Interrupted: {path.name} stopped at {cell_position(notebook, outcome.cell_index)} after "
            f"{progress.duration(outcome.seconds)}.\nThe executed copy up to that cell is saved: {shown(copy)}\n"
            f'To go on from there later: make run NOTEBOOKS="{path.name[:2]}-"')


def prerequisite_note(selected: list[Path], notebooks: list[Path], records: dict[str, dict]) -> str | None:
    """A note when notebooks before the selection never ran here (they may prepare data the selection needs)."""
    earlier = [path for path in notebooks if path.name < selected[0].name]
    missing = [path.name[:2] for path in earlier if records.get(path.stem, {}).get("status") != "ok"]
    if not missing:
        return None
    return (f"note: no executed copy of {', '.join(missing)} in this output folder yet; if {selected[0].name[:2]} "
            f'needs data they prepare, run them too: make run NOTEBOOKS="{missing[0]}-{selected[-1].name[:2]}"')


def run_all(selected: list[Path], notebooks: list[Path], executed_dir: Path, out: progress.Progress,
            verbose: bool, in_sequence: bool = True) -> tuple[int, str]:
    """Run the notebooks in order; stop at the first failure. Returns (exit status, text for the end).
    ``in_sequence``: later notebooks may need what earlier ones prepared (the course; not the solutions)."""
    profile, model = config.profile(), config.model_name()
    records = summary.run_records(executed_dir)
    expected = progress.expected_times([path.stem for path in selected], progress.readme_times(ROOT / "README.md"),
                                       records, profile, model)
    env = report.environment(ROOT, profile, model)
    total = sum(expected[path.stem][0] for path in selected) if all(p.stem in expected for p in selected) else None
    about = f", about {progress.duration(total)} in all" if total else ""
    out.say(f"make run: {len(selected)} notebook{'s' * (len(selected) != 1)} into {shown(executed_dir)} "
            f"(profile {profile}, model {model}{about})")
    if in_sequence and selected[0] != notebooks[0] and (note := prerequisite_note(selected, notebooks, records)):
        out.say(note)
    for position, path in enumerate(selected):
        notebook = nbformat.read(path, as_version=4)
        after = [expected.get(later.stem) for later in selected[position + 1:]]
        out.start(path.stem, notebook, expected.get(path.stem),
                  sum(item[0] for item in after) if all(after) else None)
        copy = executed_dir / path.name
        outcome = kernel.execute_notebook(path, copy, out, verbose=verbose,
                                          run_info={"profile": profile, "model": model, "environment": env})
        for message in outcome.kernel_messages:
            out.once(message)
        if outcome.status == "ok":
            out.finish(f"✓ {path.stem}  {progress.duration(outcome.seconds)}")
        elif outcome.status == "interrupted":
            out.finish(f"■ {path.stem}  interrupted")
            return EXIT_INTERRUPTED, interrupted_text(path, notebook, outcome, copy)
        else:
            out.finish(f"✗ {path.stem}  failed after {progress.duration(outcome.seconds)}")
            return EXIT_FAILED, failure_text(path, notebook, outcome, copy, model)
    return 0, ""


def print_summary(output_dir: Path, write_html: bool, source_dir: Path) -> None:
    """The summary table, the report, and where the files are."""
    executed_dir = output_dir / "notebooks"
    records = summary.run_records(executed_dir)
    metrics = config.read_metrics()
    rows = summary.summary_rows(records, metrics)
    smoke = " (smoke profile: a few training steps, so the accuracies mean nothing yet)" \
        if any(row.profile == "smoke" for row in rows) else ""
    print(f"\nSummary{smoke}\n" + (summary.text_table(rows) if rows else "  no notebook has run yet"))
    if unlisted := summary.unlisted_sections(metrics):
        print(f"  also in metrics.json: {', '.join(unlisted)}")
    files = [(path, what) for path, what, present in (
        (executed_dir, "executed notebooks (.ipynb, and .html pages)", executed_dir.is_dir()),
        (output_dir / "metrics.json", "every value the notebooks measured", bool(metrics)),
        (output_dir / "*.png", "figures the notebooks saved", any(output_dir.glob("*.png")))) if present]
    if write_html:
        print("\nWriting the course report ...", flush=True)
        latest = max(records.values(), key=lambda record: record.get("finished", ""), default={})
        env = latest.get("environment") or report.environment(ROOT, config.profile(), config.model_name())
        index = report.write_report(output_dir, source_dir, rows, metrics, env)
        files.insert(0, (index, "the course report: open it in a browser (no server or network needed)"))
    width = max(len(shown(path)) for path, _ in files)
    print("\nFiles\n" + "\n".join(f"  {shown(path):<{width}}  {what}" for path, what in files))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C works even when started with it ignored
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a console without Unicode still gets the text
    source = args.source or ROOT / ("solutions" if args.solutions else "notebooks")
    notebooks = sorted(source.glob(NOTEBOOK_FILES))
    if args.list:
        print("\n".join(path.stem for path in notebooks))
        return 0
    if not notebooks:
        raise SystemExit(f"No notebooks ({NOTEBOOK_FILES}) in {source}")
    selected = select(notebooks, args.notebooks)
    output_dir = config.output_dir()
    verbose = args.verbose or config.verbose()
    status, closing = 0, ""
    executed_dir = output_dir / ("solutions" if args.solutions else "notebooks")
    try:
        if not args.report_only:
            out = progress.Progress(verbose=verbose)
            status, closing = run_all(selected, notebooks, executed_dir, out, verbose, in_sequence=not args.solutions)
        if args.solutions:
            print(f"\nExecuted solutions: {shown(executed_dir)}")
        elif status != EXIT_INTERRUPTED:
            print_summary(output_dir, not args.no_report, source)
    except KeyboardInterrupt:
        status, closing = EXIT_INTERRUPTED, "Interrupted between notebooks: every executed copy is complete."
    if closing:
        print(("\n" if status == EXIT_FAILED else "") + closing)
    return status


if __name__ == "__main__":
    sys.exit(main())
