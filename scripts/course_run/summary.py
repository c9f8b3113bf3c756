"""The summary people read after ``make run``: one row per executed notebook, its time and key result.

Key results come from ``outputs/metrics.json`` through ``KEY_RESULTS``: per notebook number, lines of
``(label, segments)``. A segment is text with ``{metric.path:format}`` fields; a segment whose metrics are
missing is left out, a line with no segment left is left out — notebooks come and go, and so do keys.
To show what a new notebook records, add its lines here, e.g.::

    "09": [("instruction-tuned", ("test {instruct.accuracy.test:pct}", "trained in {instruct.train_seconds:s}"))],

Formats: ``n`` (1,045), ``pct`` (97.3%), ``s`` (3 min 05 s), ``bytes`` (47.8 MiB); anything else is a
Python format spec. Sections of metrics.json that no line reads are listed, so nothing goes unmentioned.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from course_run.kernel import RUN_INFO_KEY
from course_run.progress import duration

KEY_RESULTS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "02": [("data", ("{data.rows:n} messages ({data.spam:n} spam)",
                     "balanced {data.balanced.spam:n} spam / {data.balanced.ham:n} ham"))],
    "03": [("split", ("{data.split.train:n} / {data.split.validation:n} / {data.split.test:n} "
                      "(train / validation / test)",))],
    "04": [("classifier", ("{classifier.trainable_params:n} trainable parameters",))],
    "05": [("accuracy", ("train {classifier.accuracy.train:pct}", "validation {classifier.accuracy.validation:pct}",
                         "test {classifier.accuracy.test:pct}")),
           ("speed", ("trained in {classifier.train_seconds:s}", "{classifier.steps:n} steps",
                      "of which caching {classifier.cache_seconds:s}"))],
    "06": [("test", ("precision {classifier.test_precision:pct}", "recall {classifier.test_recall:pct}",
                     "F1 {classifier.test_f1:pct}")),
           ("baseline", ("bag of tokens, test accuracy {baseline.accuracy.test:pct}",))],
    "07": [("LoRA", ("test {lora.accuracy.test:pct}", "{lora.trainable_params:n} trainable",
                     "trained in {lora.train_seconds:s}", "peak memory {lora.peak_rss_bytes:bytes}")),
           ("QLoRA", ("test {qlora.accuracy.test:pct}", "block weights {qlora.weight_bytes:bytes} "
                      "(LoRA: {lora.weight_bytes:bytes})", "trained in {qlora.train_seconds:s}",
                      "peak memory {qlora.peak_rss_bytes:bytes}"))],
    "08": [("SmolLM2", ("test {smollm2.accuracy.test:pct}", "trained in {smollm2.train_seconds:s}")),
           ("random init", ("test {smollm2_random_init.accuracy.test:pct}",))],
}
FIELD = re.compile(r"\{([A-Za-z0-9_.\-]+)(?::([^}]*))?\}")


def lookup(metrics: dict[str, Any], path: str) -> Any:
    """``metrics["a"]["b"]`` for ``a.b``; None when any part is missing."""
    value: Any = metrics
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def human_bytes(count: float) -> str:
    """47.8 MiB, 2.3 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} B"


def format_value(value: Any, spec: str | None) -> str:
    """One metric value in the format the template asks for."""
    if spec == "n":
        return f"{value:,.0f}" if isinstance(value, float) else f"{value:,}"
    if spec == "pct":
        return f"{value:.1%}"
    if spec == "s":
        return duration(value)
    if spec == "bytes":
        return human_bytes(value)
    return format(value, spec) if spec else str(value)


def fill(template: str, metrics: dict[str, Any]) -> str | None:
    """The template with its metrics filled in; None when one is missing or has the wrong type."""
    try:
        def field_text(match: re.Match) -> str:
            value = lookup(metrics, match[1])
            if value is None:
                raise LookupError(match[1])
            return format_value(value, match[2])

        return FIELD.sub(field_text, template)
    except (LookupError, TypeError, ValueError):
        return None


def key_results(number: str, metrics: dict[str, Any]) -> list[str]:
    """The result lines of notebook ``number`` (``"05"``) that metrics.json can fill."""
    lines = []
    for label, segments in KEY_RESULTS.get(number, []):
        filled = [text for text in (fill(segment, metrics) for segment in segments) if text]
        if filled:
            lines.append(f"{label}: " + ", ".join(filled))
    return lines


def unlisted_sections(metrics: dict[str, Any]) -> list[str]:
    """Top-level sections of metrics.json that no line of KEY_RESULTS reads."""
    read = {match[1].split(".")[0] for lines in KEY_RESULTS.values() for _, segments in lines
            for segment in segments for match in FIELD.finditer(segment)}
    return sorted(set(metrics) - read)


@dataclass
class Row:
    """One executed notebook in the summary."""

    name: str  # e.g. 05_fine_tune_classifier
    status: str  # ok, failed, interrupted, or "" when the copy does not say
    seconds: float | None
    results: list[str] = field(default_factory=list)
    profile: str = ""
    model: str = ""
    error: str = ""  # what stopped it, e.g. "DownloadError: Could not download model.safetensors. Tried:"

    @property
    def problem(self) -> str:
        """``FAILED: DownloadError: ...`` / ``INTERRUPTED`` ("" when it ran to the end)."""
        if self.status in ("ok", ""):
            return ""
        return f"{self.status.upper()}: {self.error}" if self.error else self.status.upper()

    @property
    def time(self) -> str:
        return duration(self.seconds) if self.seconds is not None else "?"


def run_records(executed_dir: Path) -> dict[str, dict[str, Any]]:
    """Notebook name -> what ``make run`` recorded in its executed copy (status, seconds, profile, ...)."""
    records = {}
    for path in sorted(executed_dir.glob("[0-9][0-9]_*.ipynb")):
        try:
            metadata = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
        except (OSError, ValueError):
            continue
        records[path.stem] = metadata.get(RUN_INFO_KEY, {})
    return records


def summary_rows(records: dict[str, dict[str, Any]], metrics: dict[str, Any]) -> list[Row]:
    """A row per executed notebook, in course order; key results only for notebooks that ran to the end."""
    rows = []
    for name, record in sorted(records.items()):
        status = record.get("status", "")
        results = key_results(name[:2], metrics) if status in ("ok", "") else []
        rows.append(Row(name, status, record.get("seconds"), results, record.get("profile", ""),
                        record.get("model", ""), record.get("error") or ""))
    return rows


def wrap(line: str, width: int) -> list[str]:
    """A result line cut between its comma-separated parts (never inside "2 s"), continuations indented."""
    parts, lines = line.split(", "), []
    current = parts[0]
    for part in parts[1:]:
        if len(current) + 2 + len(part) > width:
            lines.append(current + ",")
            current = "  " + part
        else:
            current += ", " + part
    return lines + [current]


def text_table(rows: list[Row], width: int = 110) -> str:
    """The summary as aligned text, result lines wrapped under their notebook."""
    name_w = max([len("notebook")] + [len(row.name) for row in rows])
    time_w = max([len("time")] + [len(row.time) for row in rows])
    result_w = max(30, width - name_w - time_w - 6)
    lines = [f"  {'notebook':<{name_w}}  {'time':>{time_w}}  key result", "  " + "-" * (name_w + time_w + 14)]
    for row in rows:
        results = row.results or [row.problem or "—"]
        wrapped = [part for result in results for part in wrap(result, result_w)]
        for n, part in enumerate(wrapped):
            name, time = (row.name, row.time) if n == 0 else ("", "")
            lines.append(f"  {name:<{name_w}}  {time:>{time_w}}  {part}")
    return "\n".join(lines)
