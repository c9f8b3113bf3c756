"""``outputs/index.html``: the course report, one page that opens from the file system with no network.

It links every executed notebook rendered to HTML (``outputs/notebooks/NN_*.html``, figures embedded),
shows the summary table, every metric, the figures as a gallery and the run's environment.

Offline by construction: nbconvert's ``lab`` template loads require.js, MathJax, Mermaid and the widget
manager from CDNs; ``OFFLINE_TEMPLATE`` empties those blocks, widgets become their text (from their last
state, see ``widgets``), and images a notebook's Markdown takes from the repository are embedded.
"""
from __future__ import annotations

import base64
import html
import importlib.metadata
import logging
import mimetypes
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
from jinja2 import DictLoader
from nbconvert import HTMLExporter

from course_run.progress import section_headings
from course_run.summary import Row, human_bytes, unlisted_sections
from course_run.widgets import replace_widgets_by_text

OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{#- nbconvert's lab template, without the scripts it loads from CDNs -#}
{% block html_head_js_requirejs %}{% endblock %}
{% block html_head_js_mathjax %}{% endblock %}
{% block html_head_js_mermaidjs %}{% endblock %}
{% block jupyter_widgets %}{% endblock %}
"""
ENVIRONMENT_ORDER = ("started", "profile", "model", "device", "cpu", "memory", "python", "platform", "commit")
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/svg+xml": "svg"}
FIGURE_FILES = ("*.png", "*.jpg", "*.jpeg", "*.svg")
MARKDOWN_TARGET = re.compile(r"(\]\(\s*<?|\b(?:src|href)=[\"'])([^)\s\"'>]+)")
HAS_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1f2328; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; width: 100%; } th, td { text-align: left; vertical-align: top;
  padding: .35em .6em; border-bottom: 1px solid #eaeef2; } th { background: #f6f8fa; }
td.time { white-space: nowrap; text-align: right; } .failed, .interrupted { color: #cf222e; font-weight: 600; }
.note { background: #fff8c5; padding: .5em .8em; border-radius: 6px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 1em; }
figure { margin: 0; border: 1px solid #d0d7de; border-radius: 6px; padding: .5em; background: #fff; }
figure img { width: 100%; height: auto; } figcaption { font-size: .85em; color: #57606a; }
code { background: #f6f8fa; padding: .1em .3em; border-radius: 4px; }
"""
NAV = ('<nav style="font: 14px system-ui, sans-serif; padding: .6em 1em; background: #f6f8fa; '
       'border-bottom: 1px solid #d0d7de"><a href="../index.html">&larr; course report</a> · {name}</nav>')


@dataclass
class Figure:
    """One image in the gallery."""

    file: Path  # where the image is
    notebook: str  # the notebook it belongs to ("" when unknown)
    caption: str
    link: str = ""  # the notebook page (and cell) it comes from


# ---- notebook pages -----------------------------------------------------------------------------
def html_exporter() -> HTMLExporter:
    """nbconvert's lab template with nothing loaded from the network."""
    quiet = logging.getLogger("course_run.nbconvert")  # not "Alternative text is missing" for every plot
    quiet.setLevel(logging.ERROR)
    return HTMLExporter(template_name="lab", template_file="offline.html.j2", log=quiet,
                        extra_loaders=[DictLoader({"offline.html.j2": OFFLINE_TEMPLATE})])


def data_uri(path: Path) -> str:
    """The file as a ``data:`` URI (embedded in the page)."""
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def local_target(target: str, source_dir: Path, page_dir: Path, pages: dict[str, str]) -> str:
    """Where a relative link or image of a notebook's Markdown points from its HTML page."""
    if HAS_SCHEME.match(target) or target.startswith(("#", "/")):
        return target
    path, hash_, fragment = target.partition("#")
    resolved = (source_dir / path).resolve()
    if resolved.suffix == ".ipynb" and resolved.stem in pages:
        return pages[resolved.stem] + hash_ + fragment
    if resolved.is_file() and mimetypes.guess_type(resolved.name)[0] in IMAGE_TYPES:
        return data_uri(resolved)
    if resolved.exists():
        try:
            return Path(os.path.relpath(resolved, page_dir)).as_posix() + hash_ + fragment
        except ValueError:  # another drive (Windows)
            return resolved.as_uri() + hash_ + fragment
    return target


def prepare_for_html(notebook: Any, source_dir: Path, page_dir: Path, pages: dict[str, str]) -> None:
    """Widgets become their text; Markdown links and images that point into the repository still work."""
    replace_widgets_by_text(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            cell.source = MARKDOWN_TARGET.sub(
                lambda m: m[1] + local_target(m[2], source_dir, page_dir, pages), cell.source)


def render_notebook(executed: Path, source_dir: Path, pages: dict[str, str], exporter: HTMLExporter) -> Path:
    """Write ``executed`` (an .ipynb) as HTML next to it, with a link back to the report."""
    notebook = nbformat.read(executed, as_version=4)
    prepare_for_html(notebook, source_dir, executed.parent, pages)
    body, _ = exporter.from_notebook_node(notebook, resources={"metadata": {"name": executed.stem,
                                                                            "path": str(source_dir)}})
    nav = NAV.format(name=html.escape(executed.stem))
    body = re.sub(r"(<body[^>]*>)", lambda m: m[1] + nav, body, count=1)
    return write_atomically(executed.with_suffix(".html"), body)


def write_atomically(path: Path, text: str) -> Path:
    """Write under a temporary name, then rename: a page is never half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def render_notebooks(executed_dir: Path, source_dir: Path) -> dict[str, str]:
    """Render every executed notebook whose page is missing or older than it (or than this code).

    Returns notebook name -> page file name.
    """
    executed = sorted(executed_dir.glob("[0-9][0-9]_*.ipynb"))
    pages = {path.stem: path.stem + ".html" for path in executed}
    exporter = None
    for path in executed:
        page = path.with_suffix(".html")
        if not page.exists() or page.stat().st_mtime < max(path.stat().st_mtime, Path(__file__).stat().st_mtime):
            exporter = exporter or html_exporter()
            render_notebook(path, source_dir, pages, exporter)
    return pages


# ---- figures --------------------------------------------------------------------------------------
def extract_figures(executed_dir: Path, figures_dir: Path) -> list[Figure]:
    """Every image output of the executed notebooks, written to ``figures_dir`` (rebuilt each time)."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    for old in figures_dir.glob("[0-9][0-9]_*-cell*.*"):
        old.unlink()
    figures = []
    for path in sorted(executed_dir.glob("[0-9][0-9]_*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        headings = section_headings(notebook)
        for index, cell in enumerate(notebook.cells):
            images = [(mime, output["data"][mime]) for output in cell.get("outputs", [])
                      for mime in IMAGE_TYPES if mime in output.get("data", {})]
            for k, (mime, data) in enumerate(images, start=1):
                file = figures_dir / f"{path.stem}-cell{index:02d}-{k}.{IMAGE_TYPES[mime]}"
                text = "".join(data) if isinstance(data, list) else data
                file.write_bytes(text.encode() if mime == "image/svg+xml" else base64.b64decode(text))
                anchor = f"#cell-id={cell.id}" if cell.get("id") else ""
                figures.append(Figure(file, path.stem, headings.get(index) or "figure",
                                      f"{path.stem}.html{anchor}"))
    return figures


def saved_figures(output_dir: Path, notebooks: list[str]) -> list[Figure]:
    """The figure files the notebooks saved in ``outputs/`` (``05-classifier-loss.png`` belongs to 05)."""
    by_number = {name[:2]: name for name in notebooks}
    files = sorted(file for pattern in FIGURE_FILES for file in output_dir.glob(pattern))
    return [Figure(file, by_number.get(file.name[:2], ""), file.name) for file in files]


# ---- environment ----------------------------------------------------------------------------------
def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what ``platform`` knows (also used by benchmarks/)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _torch_device() -> str:
    try:
        import torch
    except ImportError:
        return "PyTorch not installed"
    if torch.cuda.is_available():
        return f"CUDA: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPU)"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "MPS (Apple GPU)"
    return "CPU only (no CUDA or MPS device)"


def _git_commit(root: Path) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + (" (with uncommitted changes)" if commit and dirty else "")


def pinned_packages(root: Path) -> list[str]:
    """Package names pinned in requirements*.txt (the course's single pin file, and SmolLM2's)."""
    names = []
    for file in sorted(root.glob("requirements*.txt")):
        for line in file.read_text().splitlines():
            match = re.match(r"\s*([A-Za-z0-9_.\-]+)==", line)
            if match:
                names.append(match[1])
    return names


def environment(root: Path, profile: str, model: str) -> dict[str, Any]:
    """Where and how this run happened: versions, device, profile (stored in each executed copy)."""
    versions = {}
    for name in pinned_packages(root):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    memory = _memory_bytes()
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "profile": profile,
        "model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": f"{cpu_name()}, {os.cpu_count()} logical cores",
        "memory": human_bytes(memory) if memory else "unknown",
        "device": _torch_device(),
        "commit": _git_commit(root),
        "packages": versions,
    }


# ---- the page -------------------------------------------------------------------------------------
def _metric_text(path: str, value: Any) -> str:
    if isinstance(value, list):
        shown = ", ".join(_metric_text(path, item) for item in value[:6])
        return f"[{shown}, … {len(value)} values]" if len(value) > 6 else f"[{shown}]"
    if isinstance(value, float):
        if "accuracy" in path or path.endswith(("_precision", "_recall", "_f1")):
            return f"{value:.2%}"
        return f"{value:,.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return human_bytes(value) + f" ({value:,} B)" if path.endswith("_bytes") else f"{value:,}"
    return str(value)


def flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """``classifier.accuracy.test`` -> ``45.67%`` rows, in key order."""
    rows = []
    for key in sorted(metrics):
        path = f"{prefix}{key}"
        value = metrics[key]
        if isinstance(value, dict):
            rows += flatten(value, path + ".")
        else:
            rows.append((path, _metric_text(path, value)))
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _card(figure: Figure, output_dir: Path) -> str:
    src = html.escape(figure.file.relative_to(output_dir).as_posix())
    target = html.escape("notebooks/" + figure.link) if figure.link else src
    caption = html.escape(figure.caption)
    return (f'<figure><a href="{target}"><img src="{src}" alt="{caption}" loading="lazy"></a>'
            f"<figcaption>{caption}</figcaption></figure>")


def _gallery(figures: list[Figure], output_dir: Path) -> str:
    """Figure cards grouped by notebook, each linking to its cell.

    A notebook usually shows the figures it saves, so when it has figures inside, its saved files are
    listed as links rather than shown twice; otherwise the files are the cards.
    """
    groups: dict[str, list[Figure]] = {}
    for figure in figures:
        groups.setdefault(figure.notebook or "other figures", []).append(figure)
    parts = []
    for name, members in groups.items():
        inside = [figure for figure in members if figure.link]
        files = [figure for figure in members if not figure.link]
        cards = "".join(_card(figure, output_dir) for figure in (inside or files))
        parts.append(f'<h3>{html.escape(name)}</h3><div class="gallery">{cards}</div>')
        if inside and files:
            links = " · ".join(f'<a href="{html.escape(f.file.relative_to(output_dir).as_posix())}">'
                               f"{html.escape(f.file.name)}</a>" for f in files)
            parts.append(f"<p><small>Saved as files: {links}</small></p>")
    return "".join(parts) or "<p>No figures yet.</p>"


def _notebooks_section(rows: list[Row], pages: dict[str, str]) -> str:
    """The summary table: each notebook's page and .ipynb, status, time, key results, profile and model."""
    if not rows:
        return "<p>No notebook has run yet: <code>make run</code>.</p>"
    esc, table_rows = html.escape, []
    for row in rows:
        name = f'<a href="notebooks/{esc(pages[row.name])}">{esc(row.name)}</a>' if row.name in pages else esc(row.name)
        copy = f'<small><a href="notebooks/{esc(row.name)}.ipynb">.ipynb</a></small>'
        status = esc(row.status or "?")
        details = "<br>".join(esc(result) for result in row.results or [row.problem or "—"])
        setup = esc(", ".join(part for part in (row.profile, row.model) if part))
        table_rows.append([f"<td>{name}<br>{copy}</td>", f'<td class="{status}">{status}</td>',
                           f'<td class="time">{esc(row.time)}</td>', f"<td>{details}</td>",
                           f"<td><small>{setup}</small></td>"])
    smoke = any(row.profile == "smoke" for row in rows)
    note = ('<p class="note">Run in the <code>smoke</code> profile: a few training steps on tiny data, so the '
            "accuracies say nothing about the method. Run <code>make run</code> for the real figures.</p>")
    return (note if smoke else "") + _table(["notebook", "status", "time", "key result", "profile, model"], table_rows)


def _metrics_section(output_dir: Path, metrics: dict[str, Any]) -> str:
    """Every value of metrics.json, one row each."""
    if not (output_dir / "metrics.json").is_file():
        return "<p>No metrics recorded yet.</p>"
    unlisted = unlisted_sections(metrics)
    also = f" The summary above does not show {html.escape(', '.join(unlisted))} yet." if unlisted else ""
    rows = [[f"<td><code>{html.escape(path)}</code></td>", f"<td>{html.escape(text)}</td>"]
            for path, text in flatten(metrics)]
    return (f'<p>Everything in <a href="metrics.json">metrics.json</a>, the course&#39;s record of what each run '
            f"measured.{also}</p>" + _table(["key", "value"], rows))


def _environment_section(env: dict[str, Any]) -> str:
    """Where the latest run happened, in a fixed order, versions last."""
    keys = [*ENVIRONMENT_ORDER, *sorted(set(env) - set(ENVIRONMENT_ORDER) - {"packages"})]
    rows = [f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(env[key]))}</td></tr>" for key in keys if key in env]
    packages = ", ".join(f"{name} {version}" for name, version in env.get("packages", {}).items())
    rows.append(f"<tr><th>packages</th><td><small>{html.escape(packages)}</small></td></tr>")
    return f"<p>The latest run's machine and versions.</p><table><tbody>{''.join(rows)}</tbody></table>"


def report_page(output_dir: Path, rows: list[Row], pages: dict[str, str], metrics: dict[str, Any],
                figures: list[Figure], env: dict[str, Any]) -> str:
    """The HTML of ``index.html`` (every path relative to ``output_dir``)."""
    generated = html.escape(time.strftime("%Y-%m-%d %H:%M"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Course report · fine-tuning a pretrained LLM</title>
<style>{CSS}</style></head>
<body>
<h1>Fine-tuning a pretrained LLM — course report</h1>
<p>Written by <code>make run</code> on {generated}: the executed notebooks, what they measured, their figures
and the machine they ran on. Every page here opens without a network.</p>
<h2 id="notebooks">Notebooks</h2>
{_notebooks_section(rows, pages)}
<h2 id="figures">Figures</h2>
<p>The figures inside the notebooks (click one to open its cell), and the files the notebooks saved in this folder.</p>
{_gallery(figures, output_dir)}
<h2 id="metrics">All metrics</h2>
{_metrics_section(output_dir, metrics)}
<h2 id="environment">Environment</h2>
{_environment_section(env)}
</body></html>
"""


def write_report(output_dir: Path, source_dir: Path, rows: list[Row], metrics: dict[str, Any],
                 env: dict[str, Any]) -> Path:
    """Render the notebook pages and figures, then write ``output_dir/index.html``; return its path."""
    executed_dir = output_dir / "notebooks"
    executed_dir.mkdir(parents=True, exist_ok=True)
    pages = render_notebooks(executed_dir, source_dir)
    figures = extract_figures(executed_dir, executed_dir / "figures")
    figures += saved_figures(output_dir, [row.name for row in rows])
    figures.sort(key=lambda figure: figure.notebook or "99")
    return write_atomically(output_dir / "index.html", report_page(output_dir, rows, pages, metrics, figures, env))
