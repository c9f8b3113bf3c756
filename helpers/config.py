"""Where things live and which profile runs: every location has a default and an env override.

| variable          | default                         | meaning                                        |
| ----------------- | ------------------------------- | ---------------------------------------------- |
| COURSE_DATA_DIR   | <repo>/data                     | downloads, CSVs, checkpoints                   |
| COURSE_OUTPUT_DIR | <repo>/outputs                  | executed notebooks, figures, metrics.json      |
| COURSE_PROFILE    | full                            | ``smoke`` = tiny fast run used by the tests    |
| COURSE_MODEL      | gpt2                            | preset name or a folder with a checkpoint      |
| SMS_SPAM_URLS     | UCI, then two mirrors           | comma-separated URLs, tried in order           |
| COURSE_CONNECT_TIMEOUT | 15                         | seconds to connect and get a download's headers |
| COURSE_STALL_TIMEOUT   | 30                         | a download fails when < 64 KiB arrive in this many seconds |


| INSTRUCTION_DATA_URLS | the book's file, pinned commit | comma-separated URLs of instruction-data.json |
| INSTRUCTION_DATA_SHA256 | the pinned file's SHA-256     | only for testing with a different file         |
| COURSE_DIST_TIMEOUT | 600                           | seconds a process waits for the others under torchrun (start-up, each collective) |
| RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT | unset | set by ``torchrun`` for each process it starts; never set them by hand |
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

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


def _seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name`` (``default`` when unset or empty)."""
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name}={raw!r} is not a positive number of seconds; unset it or set e.g. {name}={default:g}.")
    return value


def connect_timeout() -> float:
    """Seconds a download may take to connect and get the server's first answer (COURSE_CONNECT_TIMEOUT)."""
    return _seconds("COURSE_CONNECT_TIMEOUT", 15.0)


def stall_timeout() -> float:
    """Seconds a download may go with less than 64 KiB arriving before it counts as stalled (COURSE_STALL_TIMEOUT)."""
    return _seconds("COURSE_STALL_TIMEOUT", 30.0)


# --- Instruction data (notebooks 10 and 11) ---------------------------------------------------------------

# rasbt/LLMs-from-scratch, ch07 instruction-data.json (Apache-2.0), pinned to the commit that added it.
INSTRUCTION_DATA_URLS = [
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/4ac480c9ae56ead3ba3bf71060ecbcd783bb8dc6/"
    "ch07/01_main-chapter-code/instruction-data.json",
]
INSTRUCTION_DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"


def instruction_data_urls() -> list[str]:
    """Where ``instruction-data.json`` is fetched from: INSTRUCTION_DATA_URLS (comma-separated) or the pinned URL."""
    return env_list("INSTRUCTION_DATA_URLS", INSTRUCTION_DATA_URLS)


def instruction_data_sha256() -> str:
    """Its expected SHA-256: INSTRUCTION_DATA_SHA256 (only to test with another file) or the pinned file's."""
    return (os.environ.get("INSTRUCTION_DATA_SHA256", "").strip() or INSTRUCTION_DATA_SHA256).lower()


# --- Several processes (torchrun; helpers/distributed.py) -------------------------------------------------

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class TorchrunEnv(NamedTuple):
    """Where this process sits in a ``torchrun`` job: its number among all processes (``rank``), its number on
    this machine (``local_rank``, which picks the GPU), how many processes in all, and rank 0's address."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def torchrun_env() -> TorchrunEnv | None:
    """The variables ``torchrun`` sets for each process it starts, checked; None when none is set (plain ``python``)."""
    raw = {name: os.environ.get(name, "").strip() for name in TORCHRUN_VARIABLES}
    if not any(raw.values()):
        return None
    hint = "torchrun sets them for every process it starts: launch with `torchrun --nproc_per_node=N ...`, or unset them."
    missing = [name for name, value in raw.items() if not value]
    if missing:
        found = [name for name in TORCHRUN_VARIABLES if name not in missing]
        raise ValueError(f"{', '.join(found)} set but {', '.join(missing)} not; {hint}")
    try:
        rank, local_rank, world_size, port = (int(raw[name]) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                           "MASTER_PORT"))
    except ValueError:
        raise ValueError(f"RANK, LOCAL_RANK, WORLD_SIZE and MASTER_PORT must be whole numbers, got "
                         f"{ {name: raw[name] for name in TORCHRUN_VARIABLES} }; {hint}") from None
    if not (world_size >= 1 and 0 <= rank < world_size and 0 <= local_rank <= rank and 0 < port < 65536):
        raise ValueError(f"Inconsistent torchrun variables RANK={rank} LOCAL_RANK={local_rank} "
                         f"WORLD_SIZE={world_size} MASTER_PORT={port}; {hint}")
    return TorchrunEnv(rank, local_rank, world_size, raw["MASTER_ADDR"], port)


def dist_timeout() -> float:
    """Seconds a process waits for the others under torchrun: at start-up, and in any one collective
    (COURSE_DIST_TIMEOUT, default 600)."""
    return _seconds("COURSE_DIST_TIMEOUT", 600.0)
