"""Install the pinned torch on its own, before the other packages: the CPU build unless there is an NVIDIA GPU.

On Linux, PyPI's ``torch`` wheel is the CUDA build: with the CUDA libraries it pulls, several GB that a machine
without an NVIDIA GPU never uses. PyTorch publishes CPU-only wheels of the same version on its own index. Which
one this script installs (``make venv`` runs it with .venv's Python, before ``pip install -r requirements.txt``):

    TORCH_BUILD=auto     (default) the CPU build on Linux when no NVIDIA GPU is found, else pip's ordinary index
    TORCH_BUILD=cpu      the CPU build, from PyTorch's CPU index
    TORCH_BUILD=default  pip's ordinary index (PyPI): the CUDA build on Linux, the CPU/MPS build on macOS and Windows

The CPU index gets a short timeout and one retry; when it cannot be reached, the script says so and installs
from the ordinary index instead. Usage: ``python scripts/install_torch.py`` (with the Python of the environment).
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
BUILDS = ("auto", "cpu", "default")
PROBE_TIMEOUT_S = 5.0  # per try; the index answers in well under a second when it is reachable
PROBE_TRIES = 2  # one retry


@dataclass(frozen=True)
class TorchChoice:
    build: str  # "cpu" (PyTorch's CPU index) or "default" (pip's ordinary index)
    reason: str


def choose_torch_build(has_nvidia_gpu: bool, override: str | None = None, system: str = "Linux") -> TorchChoice:
    """Which torch build to install: ``override`` (TORCH_BUILD) wins; ``auto`` picks CPU on Linux without a GPU."""
    value = (override or "auto").strip().lower() or "auto"
    if value not in BUILDS:
        raise ValueError(f"TORCH_BUILD={override!r} is not one of {', '.join(BUILDS)}; unset it or pick one.")
    if value != "auto":
        return TorchChoice(value, f"TORCH_BUILD={value}")
    if has_nvidia_gpu:
        return TorchChoice("default", "an NVIDIA GPU was found")
    if system != "Linux":
        return TorchChoice("default", f"{system}: the ordinary wheel has no CUDA libraries")
    return TorchChoice("cpu", "no NVIDIA GPU found")


def has_nvidia_gpu(which: Callable[[str], str | None] = shutil.which, run: Callable = subprocess.run,
                   proc_gpus: Path = Path("/proc/driver/nvidia/gpus")) -> bool:
    """True when the NVIDIA driver lists a GPU (Linux's /proc, or ``nvidia-smi -L`` on any system)."""
    if proc_gpus.is_dir() and any(proc_gpus.iterdir()):
        return True
    smi = which("nvidia-smi")
    if not smi:
        return False
    try:
        listed = run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def pinned_torch(requirements: Path = ROOT / "requirements.txt") -> str:
    """The exact torch version pinned in requirements.txt (the course's single pin file)."""
    match = re.search(r"^torch==([^\s#;]+)", requirements.read_text(encoding="utf-8"), flags=re.MULTILINE)
    if not match:
        raise ValueError(f"{requirements} has no exact 'torch==X.Y.Z' pin")
    return match.group(1)


def index_reachable(url: str, timeout: float = PROBE_TIMEOUT_S, tries: int = PROBE_TRIES,
                    open_url: Callable = urllib.request.urlopen) -> bool:
    """True when ``url`` answers at all (any HTTP status) within ``tries`` attempts of ``timeout`` seconds."""
    for _ in range(tries):
        try:
            with open_url(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                return True
        except urllib.error.HTTPError:
            return True  # the server answered; pip will report what it lacks
        except (OSError, ValueError):
            continue  # no DNS, refused, timed out: try once more
    return False


def installed_torch() -> str | None:
    """The torch version installed in this Python's environment (e.g. ``2.13.0+cpu``), or None."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_build(version: str | None, pin: str, build: str) -> bool:
    """Whether an installed torch ``version`` is the pinned one of the chosen build (``+cpu`` marks CPU wheels)."""
    if version is None:
        return False
    base, _, local = version.partition("+")
    return base == pin and (local == "cpu") == (build == "cpu")


def pip_install_torch(pin: str, index_url: str | None, replace: bool, python: str = sys.executable) -> list[str]:
    """The pip command that installs torch alone (its small dependencies come with requirements.txt)."""
    command = [python, "-m", "pip", "install", "--quiet", "--no-deps", f"torch=={pin}"]
    if index_url:
        command += ["--index-url", index_url, "--timeout", "15", "--retries", "1"]
    if replace:
        command.append("--force-reinstall")  # another build of the same version would count as installed
    return command


def main(run: Callable = subprocess.run) -> int:
    pin = pinned_torch()
    try:
        choice = choose_torch_build(has_nvidia_gpu(), os.environ.get("TORCH_BUILD"), platform.system())
    except ValueError as error:
        print(f"install_torch: {error}", file=sys.stderr)
        return 2
    where = f"PyTorch's CPU index ({CPU_INDEX})" if choice.build == "cpu" else "pip's ordinary index"
    print(f"torch {pin}: {choice.build} build from {where} ({choice.reason}; set TORCH_BUILD=cpu|default to override)")
    current = installed_torch()
    if is_build(current, pin, choice.build):
        print(f"torch {current} is already installed")
        return 0
    replace = current is not None and current.partition("+")[0] == pin  # the same version, the other build
    if choice.build == "cpu":
        if index_reachable(CPU_INDEX + "/torch/"):
            if run(pip_install_torch(pin, CPU_INDEX, replace)).returncode == 0:
                print(f"installed torch {installed_torch()}")
                return 0
            print(f"pip could not install torch {pin} from {CPU_INDEX}; falling back to pip's ordinary index")
        else:
            print(f"{CPU_INDEX} cannot be reached; falling back to pip's ordinary index "
                  "(on Linux without a local CPU wheel that is the large CUDA build)")
        if replace:
            print(f"keeping the installed torch {current}")
            return 0
    done = run(pip_install_torch(pin, None, replace))
    if done.returncode != 0:
        print(f"install_torch: pip failed to install torch {pin} (exit {done.returncode}); see its message above",
              file=sys.stderr)
        return done.returncode
    print(f"installed torch {installed_torch()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
