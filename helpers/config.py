"""Where things live and which profile runs: every location has a default and an env override.

| variable          | default                         | meaning                                        |
| ----------------- | ------------------------------- | ---------------------------------------------- |
| COURSE_DATA_DIR   | <repo>/data                     | downloads, CSVs, checkpoints                   |
| COURSE_OUTPUT_DIR | <repo>/outputs                  | executed notebooks, figures, metrics.json      |
| COURSE_PROFILE    | full                            | ``smoke`` = tiny fast run used by the tests    |
| COURSE_MODEL      | gpt2                            | preset name or a folder with a checkpoint      |
| SMS_SPAM_URLS     | UCI, then two mirrors           | comma-separated URLs, tried in order           |
| COURSE_VERBOSE    | 0                               | ``1``: ``make run`` shows every message        |
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("full", "smoke")


def data_dir() -> Path:
    """Folder for downloads, prepared CSVs and checkpoints (created on demand)."""
    path = Path(os.environ.get("COURSE_DATA_DIR") or REPO_ROOT / "data").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def output_dir() -> Path:
    """Folder for figures and ``metrics.json`` (created on demand)."""
    path = Path(os.environ.get("COURSE_OUTPUT_DIR") or REPO_ROOT / "outputs").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def profile() -> str:
    """``full`` (default) or ``smoke`` (the fast profile the tests use)."""
    value = os.environ.get("COURSE_PROFILE", "full").strip().lower() or "full"
    if value not in PROFILES:
        raise ValueError(f"COURSE_PROFILE={value!r} is not one of {PROFILES}; unset it or pick one.")
    return value


def is_smoke() -> bool:
    """True in the fast test profile."""
    return profile() == "smoke"


def model_name() -> str:
    """Model preset (``gpt2``, ``gpt2-medium``, ...) or a checkpoint folder, from COURSE_MODEL."""
    return os.environ.get("COURSE_MODEL", "gpt2").strip() or "gpt2"


def env_list(name: str, default: list[str]) -> list[str]:
    """A comma-separated environment variable as a list (``default`` when unset or empty)."""
    raw = os.environ.get(name, "")
    items = [item.strip() for item in raw.split(",") if item.strip()]
    return items or list(default)


def _deep_merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def record_metrics(updates: dict[str, Any], path: Path | None = None) -> dict[str, Any]:
    """Merge ``updates`` (nested dicts) into ``outputs/metrics.json`` and return the whole record.

    Written atomically, so an interrupted notebook never leaves half a file.
    """
    path = path or output_dir() / "metrics.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    merged = _deep_merge(current, updates)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return merged


def read_metrics(path: Path | None = None) -> dict[str, Any]:
    """The metrics recorded so far (empty when none)."""
    path = path or output_dir() / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def verbose() -> bool:
    """True when COURSE_VERBOSE is 1/true/yes/on: ``make run`` shows every kernel message and warning."""
    return os.environ.get("COURSE_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")
