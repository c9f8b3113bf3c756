"""What ``make run`` shows while a notebook runs, and how long it should take.

In a terminal: one line, redrawn in place::

    05_fine_tune_classifier ▕████▌     ▏ 6/13 · 1:02, ~0:42 left · Training · training: 40% 260/650 [00:13<00:20]

In a log (output not a terminal, or verbose): a line per section heading, the notebook's own progress bars
every 30 s and when they finish, and a "still running" line every minute of silence.

Expected times come from the README's table of measured run times (``readme_times``; the numbers live only
there) or from this machine's last run of the same notebook with the same profile and model.
"""
from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from course_run.widgets import text_bar

BAR_EVERY_S = 30.0  # log mode: how often a running tqdm bar is printed
QUIET_EVERY_S = 60.0  # log mode: a "still running" line after this long without output
REDRAW_EVERY_S = 0.1  # terminal: at most ten redraws a second
BAR_GLYPHS = re.compile(r"\|[█▏▎▍▌▋▊▉ ]*\||[█▏▎▍▌▋▊▉]+")  # a drawn bar, as tqdm's widget or its text
BAR_COUNT = re.compile(r"\b(\d+)/(\d+) ")  # tqdm's "260/650 "
TQDM_LINE = re.compile(r"\d+%\||\d+/\d+ \[|it/s\]|s/it\]")  # text-mode tqdm output
KERNEL_CELL_PATH = re.compile(r"\S*ipykernel_\d+[/\\]\d+\.py:\d+: ")  # where a warning came from: a cell
UNITS = {"s": 1, "sec": 1, "min": 60, "h": 3600}


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def clock(seconds: float) -> str:
    """``1:02`` or ``1:02:03``."""
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def parse_duration(text: str) -> float | None:
    """``~10 s``, ``104 s``, ``19 min``, ``1 min 44 s`` -> seconds (None when there is no time)."""
    pairs = re.findall(r"(\d+(?:\.\d+)?)\s*(min|sec|s|h)\b", text)
    return sum(float(value) * UNITS[unit] for value, unit in pairs) if pairs else None


def readme_times(readme: Path) -> dict[str, float]:
    """Seconds per notebook number from the README's "Expected run times" table.

    A row ``| 01–03 | ~10 s | ... |`` (a range) gives each of its notebooks an equal share.
    Returns {} when the README or the table is missing.
    """
    try:
        lines = readme.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    start = next((i for i, line in enumerate(lines) if re.match(r"#+ .*run times", line, re.I)), None)
    if start is None:
        return {}
    times: dict[str, float] = {}
    in_table = False
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        match = re.fullmatch(r"(\d{2})(?:\s*[–-]\s*(\d{2}))?", cells[0])
        seconds = parse_duration(cells[1]) if len(cells) > 1 else None
        if match and seconds:
            first, last = int(match[1]), int(match[2] or match[1])
            for number in range(first, last + 1):
                times[f"{number:02d}"] = seconds / (last - first + 1)
    return times


def expected_times(names: list[str], readme: dict[str, float], previous: dict[str, dict[str, Any]],
                   profile: str, model: str) -> dict[str, tuple[float, str]]:
    """Notebook name -> (seconds, where the figure comes from) for the notebooks that have one.

    This machine's last successful run with the same profile and model comes first; the README's
    figures were measured in the full profile with GPT-2 124M, so they apply only there.
    """
    expected = {}
    for name in names:
        last = previous.get(name, {})
        if last.get("status") == "ok" and (last.get("profile"), last.get("model")) == (profile, model):
            expected[name] = (float(last["seconds"]), "this machine's last run")
        elif profile == "full" and model == "gpt2" and name[:2] in readme:
            expected[name] = (readme[name[:2]], "README, reference machine")
    return expected


def section_headings(notebook: Any) -> dict[int, str]:
    """Code cell index -> the latest Markdown heading above it (the section a learner sees)."""
    headings, current = {}, ""
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    current = re.sub(r"[*_`]", "", line.lstrip("#")).strip()
        elif cell.cell_type == "code" and cell.source.strip():
            headings[index] = current
    return headings


class Progress:
    """The progress display of one ``make run``; safe to call from the notebook's worker thread."""

    def __init__(self, out: TextIO | None = None, live: bool | None = None, verbose: bool = False) -> None:
        self.out = out or sys.stdout
        self.verbose = verbose
        self.live = (self.out.isatty() and not verbose) if live is None else live
        self._lock = threading.RLock()
        self._shown = 0  # characters of the status line on screen (live mode)
        self._seen: set[str] = set()  # messages shown once per run
        self._finished_bar = ""  # the bar last seen at n/n (its final state is printed once)
        self._last_draw = 0.0
        self.name, self.headings, self.order = "", {}, {}  # the running notebook; its sections; cell numbers
        self.cell, self.heading, self.bar_text = 0, "", ""
        self.expected: tuple[float, str] | None = None
        self.later: float | None = None
        self.started = self._last_print = self._last_bar_print = time.monotonic()

    # ---- one notebook --------------------------------------------------------------------------
    def start(self, name: str, notebook: Any, expected: tuple[float, str] | None, later: float | None) -> None:
        """A notebook begins; ``later`` = expected seconds of the notebooks after it (None: unknown)."""
        with self._lock:
            self.name, self.headings = name, section_headings(notebook)
            self.order = {index: n for n, index in enumerate(self.headings, start=1)}
            self.expected, self.later = expected, later
            self.started = self._last_print = self._last_bar_print = time.monotonic()
            self.cell, self.heading, self.bar_text = 0, "", ""
            usual = f" (usually ~{duration(expected[0])}: {expected[1]})" if expected else ""
            self._print(f"▶ {name}{usual}")

    def cell_started(self, index: int) -> None:
        with self._lock:
            self.cell = self.order.get(index, self.cell)
            heading = self.headings.get(index, "")
            self.bar_text = ""
            if heading != self.heading or self.verbose:
                self.heading = heading
                if not self.live:
                    self._print(f"    cell {self.cell}/{len(self.order)} · {heading} ({clock(self._elapsed())})")
            self._redraw(force=True)

    def bar(self, text: str) -> None:
        """The notebook's own progress bar (tqdm) changed."""
        with self._lock:
            self.bar_text = " ".join(BAR_GLYPHS.sub(" ", text).split())  # its percentage says enough
            now = time.monotonic()
            count = BAR_COUNT.search(self.bar_text)
            finished = bool(count) and count[1] == count[2]
            name = self.bar_text.split(":")[0]
            due = (finished and self._finished_bar != name) or \
                (bool(count) and not finished and now - self._last_bar_print >= BAR_EVERY_S)
            if not self.live and due:
                self._last_bar_print = now
                self._print(f"      {self.bar_text}")
            self._finished_bar = name if finished else ""
            self._redraw()

    def stream(self, name: str, text: str) -> None:
        """Text a cell printed: shown as it comes when verbose; else tqdm text is a bar, the rest shown once."""
        with self._lock:
            if self.verbose:
                self._clear()
                self.out.write(text)
                self.out.flush()
                return
            if name != "stderr":
                return
            other = []
            for line in text.split("\n"):
                segment = line.split("\r")[-1].strip() or line.strip()
                if "\r" in line or TQDM_LINE.search(segment):
                    if segment:
                        self.bar(segment)
                elif segment:
                    other.append(line.rstrip())
            if other:
                self.once("\n".join(other))

    def interrupting(self, presses: int) -> None:
        """Ctrl-C was pressed while the notebook ran."""
        where = f"cell {self.cell}/{len(self.order)} ({self.heading})" if self.cell else "its start"
        if presses == 1:
            self.say(f"Ctrl-C: interrupting {self.name} at {where}; the executed copy up to that cell will be "
                     "saved. Press Ctrl-C again to stop its kernel at once.")
        else:
            self.say("Ctrl-C again: stopping the kernel now.")

    def tick(self) -> None:
        """Called about twice a second: refresh the clock, or say "still running" in a quiet log."""
        with self._lock:
            if self.live:
                self._redraw()
            elif self.name and time.monotonic() - self._last_print >= QUIET_EVERY_S:
                self._print(f"    still running: cell {self.cell}/{len(self.order)} · {self.heading} "
                            f"({clock(self._elapsed())}{self._left()})")

    def finish(self, line: str) -> None:
        """The notebook ended: replace the status line by ``line``."""
        with self._lock:
            self.name = ""
            self._print(line)

    # ---- messages ------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """A permanent line (the status line is redrawn below it)."""
        with self._lock:
            self._print(text)
            self._redraw(force=True)

    def once(self, text: str) -> None:
        """A warning or kernel message: shown the first time in this run (every time when verbose)."""
        text = KERNEL_CELL_PATH.sub("", text.strip())
        if not text or (text in self._seen and not self.verbose):
            return
        self._seen.add(text)
        lines = text.splitlines()
        where = f" ({self.name})" if self.name else ""
        self.say(f"  note{where}: " + "\n        ".join(lines[:6] + (["…"] if len(lines) > 6 else [])))

    # ---- drawing -------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _left(self) -> str:
        """``, ~0:42 left`` (this notebook, and the whole run when known), or how far past the usual time."""
        if not self.expected:
            return ""
        left = self.expected[0] - self._elapsed()
        if left <= 0:
            return f", longer than the usual ~{duration(self.expected[0])}"
        whole = f"; whole run ~{clock(left + self.later)}" if self.later else ""
        return f", ~{clock(left)} left{whole}"

    def status_line(self) -> str:
        """The live line: notebook, cell bar, time (left), section, the notebook's own bar (cut first)."""
        total = len(self.order) or 1
        parts = [f"{self.name} ▕{text_bar(self.cell / total)}▏ {self.cell}/{total}",
                 clock(self._elapsed()) + self._left(), self.heading, self.bar_text]
        return " · ".join(part for part in parts if part)

    def _redraw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not (self.live and self.name) or (not force and now - self._last_draw < REDRAW_EVERY_S):
            return
        self._last_draw = now
        width = shutil.get_terminal_size((100, 20)).columns - 1
        line = self.status_line()
        line = line if len(line) <= width else line[: width - 1] + "…"
        self.out.write("\r" + line + " " * max(0, self._shown - len(line)))
        self.out.flush()
        self._shown = len(line)

    def _clear(self) -> None:
        if self._shown:
            self.out.write("\r" + " " * self._shown + "\r")
            self._shown = 0

    def _print(self, text: str) -> None:
        self._clear()
        self.out.write(text + "\n")
        self.out.flush()
        self._last_print = time.monotonic()
