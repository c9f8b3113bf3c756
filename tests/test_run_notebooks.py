"""`make run` (scripts/run_notebooks.py and scripts/course_run/): what a learner sees and gets.

Tiny notebooks written here stand in for the course where a test needs a kernel (a few seconds each);
one test runs the real notebooks 01-03 and checks the report they produce.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_notebooks.py"
sys.path.insert(0, str(ROOT / "scripts"))

import run_notebooks  # noqa: E402
from course_run import kernel, progress, report, summary, widgets  # noqa: E402
from helpers import config  # noqa: E402

V4 = nbformat.v4
SAMPLE_METRICS = {  # a smoke run's metrics.json, trimmed
    "data": {"rows": 5574, "ham": 4827, "spam": 747, "balanced": {"ham": 747, "spam": 747},
             "split": {"train": 1045, "validation": 149, "test": 300}},
    "classifier": {"trainable_params": 7090946, "accuracy": {"train": 0.98, "validation": 0.973, "test": 0.9567},
                   "train_seconds": 90.4, "steps": 650, "cache_seconds": 58.1, "test_f1": 0.95,
                   "test_precision": 0.96, "test_recall": 0.94},
    "baseline": {"accuracy": {"test": 0.92}},
    "lora": {"accuracy": {"test": 0.9633}, "trainable_params": 2655746, "train_seconds": 323.0,
             "peak_rss_bytes": 2469606195, "weight_bytes": 339738624},
    "qlora": {"accuracy": {"test": 0.96}, "train_seconds": 403.0, "weight_bytes": 47775744},
}


# ---- helpers ------------------------------------------------------------------------------------
def tiny_png() -> bytes:
    """A valid 1x1 PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + \
        chunk(b"IEND", b"")


def write_notebook(folder: Path, name: str, *cells: str) -> Path:
    """A notebook whose cells are Markdown when they start with ``#``, code otherwise."""
    notebook = V4.new_notebook()
    notebook.cells = [V4.new_markdown_cell(c) if c.startswith("#") else V4.new_code_cell(c) for c in cells]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.ipynb"
    nbformat.write(notebook, path)
    return path


@pytest.fixture
def course(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(a notebooks folder, the output folder), with data and outputs in tmp_path."""
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("COURSE_VERBOSE", raising=False)
    return tmp_path / "notebooks", tmp_path / "outputs"


def run_main(source: Path, *args: str) -> int:
    return run_notebooks.main(["--source", str(source), *args])


class Page(HTMLParser):
    """The links, images, ids and remote scripts/stylesheets of one HTML page."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []
        self.ids: set[str] = set()
        self.remote: list[str] = []
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {key: value or "" for key, value in attrs}
        if "id" in attr:
            self.ids.add(attr["id"])
        if tag == "a" and attr.get("href"):
            self.links.append(attr["href"])
        if tag == "img":
            self.images.append(attr.get("src", ""))
        if tag in ("script", "link") and re.match(r"(https?:)?//", attr.get("src") or attr.get("href") or ""):
            self.remote.append(f"<{tag}> {attr.get('src') or attr.get('href')}")


def image_bytes_ok(data: bytes) -> bool:
    return data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")) or b"<svg" in data[:500]


def report_problems(output_dir: Path) -> list[str]:
    """Every broken local link, image that would not load, or remote script/stylesheet in the report."""
    problems = []
    pages = [output_dir / "index.html", *sorted((output_dir / "notebooks").glob("*.html"))]
    parsed = {page.resolve(): Page(page) for page in pages}
    for page, html_page in parsed.items():
        problems += [f"{page.name}: remote {remote}" for remote in html_page.remote]
        for src in html_page.images:
            if src.startswith("data:"):
                ok = image_bytes_ok(base64.b64decode(src.split(",", 1)[1])) if ";base64," in src else "<svg" in src
            else:
                file = (page.parent / unquote(src)).resolve()
                ok = not re.match(r"\w+:", src) and file.is_file() and image_bytes_ok(file.read_bytes())
            if not ok:
                problems.append(f"{page.name}: image does not load: {src[:80]}")
        for href in html_page.links:
            if re.match(r"(https?|mailto):", href):
                continue  # an ordinary web link, not needed to show the page
            target, _, fragment = href.partition("#")
            file = (page.parent / unquote(target)).resolve() if target else page
            if not file.exists():
                problems.append(f"{page.name}: broken link {href}")
            elif fragment and file.suffix == ".html":
                ids = (parsed.get(file) or Page(file)).ids
                if unquote(fragment) not in ids and fragment not in ids:
                    problems.append(f"{page.name}: no #{fragment} in {file.name}")
    return problems


# ---- estimates and progress ---------------------------------------------------------------------
def test_readme_times_table_parses_and_names_existing_notebooks():
    times = progress.readme_times(ROOT / "README.md")
    numbers = {path.name[:2] for path in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert {f"{n:02d}" for n in range(1, 9)} <= set(times), "README's run-time table lost a notebook 01-08"
    assert set(times) <= numbers, f"README times for notebooks that do not exist: {set(times) - numbers}"
    assert all(seconds > 0 for seconds in times.values())
    row = next(line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("| 07 |"))
    assert times["07"] == progress.parse_duration(row.split("|")[2])


def test_durations_parse_and_print():
    assert progress.parse_duration("~10 s") == 10
    assert progress.parse_duration("1 min 44 s") == 104
    assert progress.parse_duration("19 min") == 1140
    assert progress.parse_duration("n/a") is None
    assert progress.duration(42) == "42 s" and progress.duration(185) == "3 min 05 s"
    assert progress.clock(3725) == "1:02:05"


def test_readme_range_row_is_shared(tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n### Expected run times\n\n| notebook | time |\n|---|---|\n| 01–03 | ~9 s |\n"
                      "| 04 | 2 min |\n\n| 05 | 1 s |\n")
    assert progress.readme_times(readme) == {"01": 3, "02": 3, "03": 3, "04": 120}  # the table ends at the gap
    assert progress.readme_times(tmp_path / "missing.md") == {}


def test_expected_times_prefer_this_machine_and_fit_the_readme_conditions():
    readme = {"05": 104.0}
    previous = {"05_x": {"status": "ok", "seconds": 80.0, "profile": "full", "model": "gpt2"},
                "06_y": {"status": "failed", "seconds": 3.0, "profile": "smoke", "model": "gpt2"}}
    assert progress.expected_times(["05_x"], readme, previous, "full", "gpt2") == \
        {"05_x": (80.0, "this machine's last run")}
    assert progress.expected_times(["05_x"], readme, {}, "full", "gpt2") == \
        {"05_x": (104.0, "README, reference machine")}
    assert progress.expected_times(["05_x", "06_y"], readme, previous, "smoke", "gpt2") == {}  # no smoke figures


def test_progress_log_mode_shows_sections_bars_and_warnings_once():
    out = io.StringIO()
    display = progress.Progress(out, live=False)
    notebook = V4.new_notebook()
    notebook.cells = [V4.new_markdown_cell("# 05 · Title\n## Training"), V4.new_code_cell("a"),
                      V4.new_markdown_cell("## Final accuracy"), V4.new_code_cell("b")]
    display.start("05_x", notebook, (100.0, "README"), 50.0)
    display.cell_started(1)
    display.bar("training:  50% █████      3/6 [00:01<00:01]")  # not printed: not finished, not 30 s yet
    display.bar("training: 100% █████████▌ 5/6 [00:02<00:00]")  # tqdm updates its parts one by one
    display.bar("training: 100% ██████████ 6/6 [00:02<00:00]")
    display.bar("training: 100% ██████████ 6/6 [00:02<00:00, loss=0.7]")  # finished: shown once
    display.stream("stderr", "/tmp/ipykernel_123/456.py:4: UserWarning: careful\n  warn('careful')\n")
    display.stream("stderr", "\rcaching:  10%|█         | 1/10 [00:00<?, ?it/s]")  # text-mode tqdm: a bar
    assert display.bar_text == "caching: 10% 1/10 [00:00<?, ?it/s]"
    display.stream("stderr", "/tmp/ipykernel_999/111.py:7: UserWarning: careful\n  warn('careful')\n")
    display.stream("stdout", "printed by the cell\n")  # quiet: in the executed copy only
    display.cell_started(3)
    display.finish("✓ 05_x  2 s")
    text = out.getvalue()
    assert "▶ 05_x (usually ~1 min 40 s: README)" in text
    assert "cell 1/2 · Training" in text and "cell 2/2 · Final accuracy" in text
    assert "training: 100% 6/6 [00:02<00:00]" in text and "3/6" not in text and "5/6" not in text
    assert text.count("6/6") == 1
    assert text.count("UserWarning: careful") == 1, "a warning is shown once per run"
    assert "ipykernel_" not in text and "printed by the cell" not in text
    assert text.rstrip().endswith("✓ 05_x  2 s")


def test_progress_status_line_has_heading_cell_bar_inner_bar_and_time_left():
    display = progress.Progress(io.StringIO(), live=True)
    notebook = V4.new_notebook()
    notebook.cells = [V4.new_markdown_cell("## Training"), V4.new_code_cell("a"), V4.new_code_cell("b")]
    display.start("07_lora", notebook, (600.0, "README"), 220.0)
    display.cell_started(1)
    display.bar("training:  40% ████ 260/650")
    line = display.status_line()
    assert line.startswith("07_lora ▕█████") and "1/2" in line and "Training" in line
    assert "training: 40% 260/650" in line and "left" in line and "whole run ~" in line
    assert line.index("left") < line.index("Training"), "the time comes before what a narrow terminal cuts"


# ---- selection ----------------------------------------------------------------------------------
def test_select_numbers_names_and_ranges(tmp_path: Path):
    paths = [tmp_path / f"{n:02d}_nb.ipynb" for n in range(1, 12)]
    names = lambda chosen: [p.name[:2] for p in chosen]  # noqa: E731
    assert names(run_notebooks.select(paths, [])) == [f"{n:02d}" for n in range(1, 12)]
    assert names(run_notebooks.select(paths, ["06", "5"])) == ["05", "06"]
    assert names(run_notebooks.select(paths, ["04-06"])) == ["04", "05", "06"]
    assert names(run_notebooks.select(paths, ["09-"])) == ["09", "10", "11"]
    assert names(run_notebooks.select(paths, ["03_nb"])) == ["03"]
    with pytest.raises(SystemExit, match="No notebook matches '42'"):
        run_notebooks.select(paths, ["42"])


# ---- summary ------------------------------------------------------------------------------------
def test_summary_table_from_sample_metrics():
    records = {"01_what": {"status": "ok", "seconds": 2.0}, "02_data": {"status": "ok", "seconds": 9.0},
               "03_split": {"status": "ok", "seconds": 10.0}, "05_train": {"status": "ok", "seconds": 104.0},
               "06_eval": {"status": "ok", "seconds": 45.0}, "07_lora": {"status": "ok", "seconds": 1140.0},
               "08_smol": {"status": "failed", "seconds": 12.0, "error": "DownloadError: Could not download x"}}
    table = summary.text_table(summary.summary_rows(records, SAMPLE_METRICS))
    assert "02_data" in table and "5,574 messages (747 spam)" in table and "balanced 747 spam / 747 ham" in table
    assert "1,045 / 149 / 300" in table
    assert "train 98.0%, validation 97.3%, test 95.7%" in table
    assert "trained in 1 min 30 s" in table and "650 steps" in table
    assert "precision 96.0%" in table and "bag of tokens, test accuracy 92.0%" in table
    assert "LoRA: test 96.3%" in table and "peak memory 2.3 GiB" in table
    assert "block weights 45.6 MiB (LoRA: 324.0 MiB)" in table
    assert "FAILED: DownloadError: Could not download x" in table
    assert "19 min 00 s" in table and "{" not in table


def test_summary_tolerates_missing_keys_and_names_unread_sections(monkeypatch: pytest.MonkeyPatch):
    partial = {"lora": {"accuracy": {"test": 0.5}}, "instruct": {"accuracy": {"test": 0.7}}, "experiments": []}
    rows = summary.summary_rows({"05_train": {}, "07_lora": {"status": "ok"}, "09_new": {"status": "ok"}}, partial)
    assert [row.results for row in rows] == [[], ["LoRA: test 50.0%"], []]
    assert summary.unlisted_sections(partial) == ["experiments", "instruct"]
    assert "—" in summary.text_table(rows)
    # a new notebook's key results are one entry away
    monkeypatch.setitem(summary.KEY_RESULTS, "09", [("instruction-tuned", ("test {instruct.accuracy.test:pct}",))])
    assert summary.key_results("09", partial) == ["instruction-tuned: test 70.0%"]
    assert summary.unlisted_sections(partial) == ["experiments"]
    assert summary.fill("{lora.accuracy.test:n}", {"lora": {"accuracy": {"test": "oops"}}}) is None  # wrong type


def test_summary_wraps_between_parts():
    lines = summary.wrap("LoRA: test 46.3%, 18,498 trainable, trained in 2 s, peak memory 516.6 MiB", 40)
    assert all(len(line) <= 42 for line in lines) and any("trained in 2 s" in line for line in lines)


# ---- widgets ------------------------------------------------------------------------------------
def tqdm_states(done: int = 6, total: int = 6) -> dict[str, dict]:
    return {"box": {"_model_name": "HBoxModel", "children": ["IPY_MODEL_left", "IPY_MODEL_bar", "IPY_MODEL_right"]},
            "left": {"_model_name": "HTMLModel", "value": f"training:\u2007{done * 100 // total}%"},
            "bar": {"_model_name": "FloatProgressModel", "value": float(done), "min": 0, "max": float(total)},
            "right": {"_model_name": "HTMLModel", "value": f"\u2007{done}/{total}\u2007[00:02&lt;00:00]"}}


def test_widget_text_for_tqdm_buttons_and_outputs():
    states = tqdm_states(3, 6)
    assert widgets.widget_text(states, "IPY_MODEL_box") == "training: 50% █████      3/6 [00:02<00:00]"
    assert widgets.progress_bar_text(states, "right") == widgets.widget_text(states, "box")
    assert widgets.progress_bar_text({"x": {"_model_name": "HTMLModel", "value": "hi"}}, "x") is None
    states = {"v": {"_model_name": "VBoxModel", "children": ["IPY_MODEL_t", "IPY_MODEL_b", "IPY_MODEL_o"]},
              "t": {"_model_name": "TextareaModel", "description": "Message:", "value": "Win a prize"},
              "b": {"_model_name": "ButtonModel", "description": "Classify"},
              "o": {"_model_name": "OutputModel", "outputs": [{"output_type": "stream", "text": "SPAM\n"}]}}
    assert widgets.widget_text(states, "v") == "Message: Win a prize\n[ Classify ]\nSPAM"


# ---- the report ---------------------------------------------------------------------------------
def synthetic_outputs(source: Path, output_dir: Path) -> None:
    """Two executed notebooks (one with a figure, a widget and repository links; one failed) and a figure file."""
    (source.parent / "images").mkdir(parents=True, exist_ok=True)
    (source.parent / "images" / "diagram.png").write_bytes(tiny_png())
    executed = output_dir / "notebooks"
    first = write_notebook(executed, "01_first", "# 01 · First\n## A figure\n![diagram](../images/diagram.png) "
                           "Next: [the second notebook](02_second.ipynb#Why), [PyPI](https://pypi.org)",
                           "plot()", "bar()", "## The end", "print('done')")
    notebook = nbformat.read(first, as_version=4)
    notebook.cells[1].outputs = [V4.new_output("display_data", {"image/png": base64.b64encode(tiny_png()).decode(),
                                                                "text/plain": "<Figure>"})]
    notebook.cells[2].outputs = [V4.new_output("display_data", {
        widgets.WIDGET_VIEW: {"model_id": "box", "version_major": 2, "version_minor": 0},
        "text/plain": "training:   0%|          | 0/6 [00:00<?, ?it/s]"})]
    notebook.metadata.widgets = {widgets.WIDGET_STATE: {"state": {
        model_id: {"model_name": state["_model_name"], "state": state} for model_id, state in tqdm_states().items()},
        "version_major": 2, "version_minor": 0}}
    notebook.metadata[kernel.RUN_INFO_KEY] = {"status": "ok", "seconds": 3.5, "profile": "smoke", "model": "gpt2"}
    nbformat.write(notebook, first)
    second = write_notebook(executed, "02_second", "# 02 · Second\n## Why", "download()")
    notebook = nbformat.read(second, as_version=4)
    notebook.cells[1].outputs = [V4.new_output("error", ename="DownloadError", evalue="no network", traceback=[])]
    notebook.metadata[kernel.RUN_INFO_KEY] = {"status": "failed", "seconds": 1.0, "error": "DownloadError: no network"}
    nbformat.write(notebook, second)
    (output_dir / "02-class-balance.png").write_bytes(tiny_png())
    (output_dir / "metrics.json").write_text(json.dumps(SAMPLE_METRICS))


def test_report_links_images_and_no_network(course: tuple[Path, Path]):
    source, output_dir = course
    synthetic_outputs(source, output_dir)
    rows = summary.summary_rows(summary.run_records(output_dir / "notebooks"), SAMPLE_METRICS)
    env = report.environment(ROOT, "smoke", "gpt2")
    index = report.write_report(output_dir, source, rows, SAMPLE_METRICS, env)
    assert index == output_dir / "index.html" and index.is_file()
    assert report_problems(output_dir) == []
    page = index.read_text()
    assert 'href="notebooks/01_first.html"' in page and 'href="notebooks/02_second.html"' in page
    assert "<td>FAILED: DownloadError: no network</td>" in page  # a failed notebook shows why, not results
    assert "classifier.accuracy.test" in page and "95.67%" in page  # the metrics table
    assert "torch" in page and env["python"] in page and "smoke" in page  # the environment
    index_page = Page(index)
    assert sorted(index_page.images) == ["02-class-balance.png", "notebooks/figures/01_first-cell01-1.png"]
    (output_dir / "01-first-saved.png").write_bytes(tiny_png())  # saved by a notebook that shows figures:
    report.write_report(output_dir, source, rows, SAMPLE_METRICS, env)  # a link, not a second card
    assert "01-first-saved.png" in Page(index).links and "01-first-saved.png" not in Page(index).images
    assert report_problems(output_dir) == []
    figure_cell = nbformat.read(output_dir / "notebooks" / "01_first.ipynb", as_version=4).cells[1]
    assert f"notebooks/01_first.html#cell-id={figure_cell.id}" in index_page.links  # a figure opens its cell
    first = (output_dir / "notebooks" / "01_first.html").read_text()
    assert "training: 100% ██████████ 6/6 [00:02&lt;00:00]" in first, "a widget shows its last state as text"
    assert widgets.WIDGET_VIEW not in first and "require.js" not in first and "mathjax" not in first.lower()
    assert 'href="02_second.html#Why"' in first and "data:image/png;base64," in first  # repository image embedded


def test_report_tolerates_an_empty_output_folder(course: tuple[Path, Path]):
    source, output_dir = course
    index = report.write_report(output_dir, source, [], {}, report.environment(ROOT, "full", "gpt2"))
    assert "No notebook has run yet" in index.read_text() and report_problems(output_dir) == []


# ---- running notebooks (kernels) ----------------------------------------------------------------
def test_partial_rerun_runs_only_the_chosen_notebooks(course: tuple[Path, Path], capsys: pytest.CaptureFixture):
    source, output_dir = course
    write_notebook(source, "01_prepare", "# 01 · Prepare", "from helpers import config\n"
                   "(config.data_dir() / 'prepared.txt').write_text('747')")
    write_notebook(source, "02_use", "# 02 · Use", "from helpers import config\n"
                   "print((config.data_dir() / 'prepared.txt').read_text())")
    write_notebook(source, "03_more", "# 03 · More", "1 + 1")
    assert run_main(source, "01", "--no-report") == 0
    executed = output_dir / "notebooks"
    assert sorted(path.name for path in executed.glob("*.ipynb")) == ["01_prepare.ipynb"]
    first_copy = (executed / "01_prepare.ipynb").stat().st_mtime_ns
    capsys.readouterr()

    assert run_main(source, "02") == 0  # reuses data/prepared.txt from 01
    out = capsys.readouterr().out
    assert sorted(path.name for path in executed.glob("*.ipynb")) == ["01_prepare.ipynb", "02_use.ipynb"]
    assert (executed / "01_prepare.ipynb").stat().st_mtime_ns == first_copy, "01 must not run again"
    assert "▶ 02_use" in out and "▶ 01_prepare" not in out and "▶ 03_more" not in out
    assert re.search(r"01_prepare\s+\d+ s", out) and re.search(r"02_use\s+\d+ s", out), "the summary covers both"
    copy = nbformat.read(executed / "02_use.ipynb", as_version=4)
    assert copy.cells[1].outputs[0]["text"] == "747\n" and copy.metadata.course_run["status"] == "ok"
    assert report_problems(output_dir) == [] and (executed / "02_use.html").is_file()


def test_download_failure_stops_with_the_message_and_the_way_forward(course: tuple[Path, Path],
                                                                     capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch):
    source, output_dir = course
    monkeypatch.setenv("COURSE_MODEL", "gpt2")
    write_notebook(source, "01_weights", "# 01 · Weights\n## Download",
                   "class DownloadError(RuntimeError):\n    pass\n"
                   "raise DownloadError('Could not download model.safetensors. Tried:\\n  - https://hub/x: timed out')")
    write_notebook(source, "02_after", "# 02 · After", "1 + 1")
    assert run_main(source, "--no-report") == run_notebooks.EXIT_FAILED
    out = capsys.readouterr().out
    assert "01_weights failed at cell 1/1 (Download)" in out
    assert "DownloadError: Could not download model.safetensors. Tried:\n    - https://hub/x: timed out" in out
    assert "COURSE_MODEL=smollm2-135m make run" in out and "Working offline" in out
    assert not (output_dir / "notebooks" / "02_after.ipynb").exists(), "the run stops at the failed notebook"
    assert "FAILED: DownloadError: Could not download model.safetensors." in out  # in the summary table too
    assert "COURSE_MODEL=" not in run_notebooks.download_hint("smollm2-135m")


def test_no_transport_warning_and_warnings_shown_once(course: tuple[Path, Path]):
    source, output_dir = course
    for name in ("01_one", "02_two"):
        write_notebook(source, name, f"# {name}", "import warnings\nwarnings.warn('the same warning')")
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--source", str(source), "--no-report"], env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "without encryption" not in output and "IPKernelApp" not in output
    assert output.count("UserWarning: the same warning") == 1, output


def test_tcp_fallback_filters_the_transport_warning(course: tuple[Path, Path]):
    source, output_dir = course
    assert kernel.kernel_connection()["transport"] == ("tcp" if os.name == "nt" else "ipc")
    raw = "[IPKernelApp] WARNING | Kernel is running over TCP without encryption. All communication ...\nreal\n"
    assert kernel.kernel_messages(raw) == ["real"]
    path = write_notebook(source, "01_tcp", "# 01", "1 + 1")
    display = progress.Progress(io.StringIO(), live=False)
    display.start(path.stem, nbformat.read(path, as_version=4), None, None)
    outcome = kernel.execute_notebook(path, output_dir / "01_tcp.ipynb", display, run_info={}, transport="tcp")
    assert outcome.status == "ok"
    assert not any("without encryption" in line for line in outcome.kernel_messages)


def run_with_ctrl_c(source: Path, presses: list[tuple[str, float]]) -> tuple[int, str]:
    """``make run`` on ``source`` in a subprocess, pressing Ctrl-C (SIGINT) ``delay`` seconds after the first log
    line containing each ``(text, delay)``, in order; returns the exit status and the whole log."""
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--source", str(source)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(240, process.kill)
    watchdog.start()
    lines, waiting = [], list(presses)
    try:
        for line in process.stdout:  # log mode: a line when a section starts
            lines.append(line)
            if waiting[0][0] in line:
                time.sleep(waiting.pop(0)[1])
                process.send_signal(signal.SIGINT)
                if not waiting:
                    break
        lines += process.stdout.readlines()
        status = process.wait(timeout=120)
    finally:
        watchdog.cancel()
        process.kill()
    return status, "".join(lines)


@pytest.mark.skipif(os.name == "nt", reason="sends SIGINT, a POSIX signal")
def test_ctrl_c_stops_cleanly_and_saves_the_copy_up_to_that_cell(course: tuple[Path, Path]):
    source, output_dir = course
    write_notebook(source, "01_sleep", "# 01 · Sleep\n## Warm up", "print('hi')", "## Sleeping",
                   "import time\ntime.sleep(120)", "print('never')")
    write_notebook(source, "02_next", "# 02", "1 + 1")
    status, output = run_with_ctrl_c(source, [("cell 2/3 · Sleeping", 0)])
    assert status == run_notebooks.EXIT_INTERRUPTED, output
    assert "Interrupted: 01_sleep.ipynb stopped at cell 2/3 (Sleeping)" in output
    assert "The executed copy up to that cell is saved:" in output and "Traceback" not in output
    copy = nbformat.read(output_dir / "notebooks" / "01_sleep.ipynb", as_version=4)
    code = [cell for cell in copy.cells if cell.cell_type == "code"]
    assert code[0].outputs[0]["text"] == "hi\n"
    assert code[1].outputs[-1]["ename"] == "KeyboardInterrupt"
    assert code[2].outputs == [] and code[2].execution_count is None
    assert copy.metadata.course_run["status"] == "interrupted"
    assert not (output_dir / "notebooks" / "02_next.ipynb").exists()


@pytest.mark.skipif(os.name == "nt", reason="sends SIGINT, a POSIX signal")
def test_a_second_ctrl_c_stops_a_kernel_that_ignores_the_first(course: tuple[Path, Path]):
    source, output_dir = course
    write_notebook(source, "01_stubborn", "# 01 · Stubborn", "## Ignoring Ctrl-C",
                   "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(120)")
    # the second Ctrl-C 4 s after the first: the first interrupt and its repeat reached a kernel that ignores them
    status, output = run_with_ctrl_c(source, [("cell 1/1 · Ignoring Ctrl-C", 2), ("Press Ctrl-C again", 4)])
    assert status == run_notebooks.EXIT_INTERRUPTED, output
    assert "Interrupted: 01_stubborn.ipynb stopped at cell 1/1" in output and "Traceback" not in output
    copy = nbformat.read(output_dir / "notebooks" / "01_stubborn.ipynb", as_version=4)
    assert copy.metadata.course_run["status"] == "interrupted"


@pytest.mark.slow
@pytest.mark.needs_tokenizer
def test_real_notebooks_01_to_03_give_a_complete_offline_report(course: tuple[Path, Path],
                                                                capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch):
    _, output_dir = course
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernels draw inline, as in a learner's `make run`
    assert run_notebooks.main(["01-03"]) == 0
    out = capsys.readouterr().out
    assert "5,574 messages (747 spam)" in out and "1,045 / 149 / 300" in out
    assert "index.html" in out and "{" not in out.split("Summary", 1)[1]  # a table, no raw JSON
    assert report_problems(output_dir) == []
    pages = sorted(path.name for path in (output_dir / "notebooks").glob("*.html"))
    assert pages == [path.stem + ".html" for path in sorted((ROOT / "notebooks").glob("0[1-3]_*.ipynb"))]
    index = Page(output_dir / "index.html")
    page_02 = Page(output_dir / "notebooks" / "02_download_and_balance.html")
    assert any(src.startswith("figures/02_") or src.startswith("data:image") for src in page_02.images), (
        f"notebook 02's plot is not in its page: {page_02.images[:5]}")  # a figure inside a notebook's page
    saved = sorted(path.name for path in output_dir.glob("0[23]_*.png"))
    assert saved and all(name in index.images + index.links for name in saved)  # figures saved in outputs/


def test_verbose_setting_is_read_in_config_and_documented(monkeypatch: pytest.MonkeyPatch):
    for value, expected in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv("COURSE_VERBOSE", value)
        assert config.verbose() is expected
    assert "COURSE_VERBOSE" in (config.__doc__ or "") and "`COURSE_VERBOSE`" in (ROOT / "README.md").read_text()


def test_solutions_run_into_their_own_folder_without_the_course_report(course: tuple[Path, Path],
                                                                        capsys: pytest.CaptureFixture):
    source, output_dir = course
    write_notebook(source, "05_answers", "# Solutions · 05", "print(6 * 7)")
    write_notebook(source, "06_answers", "# Solutions · 06", "1 + 1")
    assert run_main(source, "--solutions", "05") == 0
    executed = output_dir / "solutions"
    assert sorted(path.name for path in executed.glob("*.ipynb")) == ["05_answers.ipynb"]
    assert nbformat.read(executed / "05_answers.ipynb", as_version=4).cells[1].outputs[0]["text"] == "42\n"
    assert not (output_dir / "notebooks").exists() and not (output_dir / "index.html").exists()
    assert "outputs/solutions" in capsys.readouterr().out.replace("\\", "/")


def test_solutions_option_lists_the_solutions_folder(capsys: pytest.CaptureFixture):
    assert run_notebooks.main(["--solutions", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == sorted(path.stem for path in (ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")) and listed
