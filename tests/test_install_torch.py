"""scripts/install_torch.py: which torch build `make venv` installs, and its fallback when the CPU index is away."""
from __future__ import annotations

import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import install_torch  # noqa: E402
from install_torch import choose_torch_build, has_nvidia_gpu, index_reachable, is_build  # noqa: E402


@pytest.mark.parametrize("gpu, override, system, build", [
    (False, None, "Linux", "cpu"),  # the case this script exists for: no CUDA download
    (True, None, "Linux", "default"),
    (False, "", "Linux", "cpu"),
    (False, "auto", "Linux", "cpu"),
    (False, None, "Darwin", "default"),  # macOS and Windows wheels carry no CUDA libraries
    (False, None, "Windows", "default"),
    (True, "cpu", "Linux", "cpu"),  # the override wins both ways
    (False, "default", "Linux", "default"),
    (False, " CPU ", "Linux", "cpu"),
])
def test_choose_torch_build(gpu, override, system, build):
    choice = choose_torch_build(gpu, override, system)
    assert choice.build == build
    assert choice.reason


def test_choose_torch_build_rejects_unknown_override():
    with pytest.raises(ValueError, match="TORCH_BUILD='cuda12' is not one of auto, cpu, default"):
        choose_torch_build(False, "cuda12")


def smi(returncode: int = 0, stdout: str = "GPU 0: NVIDIA H100 (UUID: GPU-1)\n"):
    return lambda command, **kwargs: subprocess.CompletedProcess(command, returncode, stdout, "")


def test_gpu_found_through_proc(tmp_path):
    (tmp_path / "0000:00:1e.0").mkdir()
    assert has_nvidia_gpu(which=lambda name: None, proc_gpus=tmp_path)


def test_gpu_found_through_nvidia_smi(tmp_path):
    assert has_nvidia_gpu(which=lambda name: "/usr/bin/nvidia-smi", run=smi(), proc_gpus=tmp_path / "absent")


@pytest.mark.parametrize("which, run", [
    (lambda name: None, smi()),  # no nvidia-smi at all
    (lambda name: "/usr/bin/nvidia-smi", smi(returncode=9, stdout="")),  # installed, but no driver loaded
    (lambda name: "/usr/bin/nvidia-smi", smi(stdout="No devices found.\n")),
])
def test_no_gpu(tmp_path, which, run):
    (tmp_path / "gpus").mkdir()  # the driver's folder, empty
    assert not has_nvidia_gpu(which=which, run=run, proc_gpus=tmp_path / "gpus")


def test_nvidia_smi_that_hangs_means_no_gpu(tmp_path):
    def hang(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    assert not has_nvidia_gpu(which=lambda name: "nvidia-smi", run=hang, proc_gpus=tmp_path)


def test_pinned_torch_is_read_from_requirements(tmp_path):
    assert install_torch.pinned_torch() == "2.13.0"
    bare = tmp_path / "requirements.txt"
    bare.write_text("torch\nnumpy==2.4.6\n")
    with pytest.raises(ValueError, match="no exact 'torch==X.Y.Z' pin"):
        install_torch.pinned_torch(bare)


@pytest.mark.parametrize("version, build, expected", [
    ("2.13.0+cpu", "cpu", True),
    ("2.13.0", "cpu", False),  # the CUDA build is installed: replace it
    ("2.13.0", "default", True),
    ("2.13.0+cpu", "default", False),
    ("2.12.1+cpu", "cpu", False),
    (None, "cpu", False),
])
def test_is_build(version, build, expected):
    assert is_build(version, "2.13.0", build) is expected


def test_index_probe_retries_once_then_gives_up():
    calls = []

    def unreachable(request, timeout):
        calls.append((request.get_method(), request.full_url, timeout))
        raise urllib.error.URLError("Name or service not known")

    assert not index_reachable("https://index.invalid/torch/", timeout=0.5, open_url=unreachable)
    assert calls == [("HEAD", "https://index.invalid/torch/", 0.5)] * 2


def test_index_that_answers_with_an_http_error_is_reachable():
    def forbidden(request, timeout):
        raise urllib.error.HTTPError(request.full_url, 403, "Forbidden", {}, None)

    assert index_reachable("https://index.example/torch/", open_url=forbidden)


class Pip:
    """Records pip commands instead of running them; fails those that name an index in ``failing``."""

    def __init__(self, failing: tuple[str, ...] = ()):
        self.commands: list[list[str]] = []
        self.failing = failing

    def __call__(self, command: list[str], **kwargs) -> subprocess.CompletedProcess:
        self.commands.append(command)
        failed = any(url in command for url in self.failing)
        return subprocess.CompletedProcess(command, 1 if failed else 0)


@pytest.fixture
def no_gpu_linux(monkeypatch):
    monkeypatch.delenv("TORCH_BUILD", raising=False)
    monkeypatch.setattr(install_torch, "has_nvidia_gpu", lambda: False)
    monkeypatch.setattr(install_torch.platform, "system", lambda: "Linux")
    monkeypatch.setattr(install_torch, "installed_torch", lambda: None)


def index_of(command: list[str]) -> str | None:
    return command[command.index("--index-url") + 1] if "--index-url" in command else None


def test_main_installs_the_cpu_build_from_the_cpu_index(no_gpu_linux, monkeypatch, capsys):
    monkeypatch.setattr(install_torch, "index_reachable", lambda url: True)
    pip = Pip()
    assert install_torch.main(run=pip) == 0
    [command] = pip.commands
    assert command[-8:] == ["--no-deps", "torch==2.13.0", "--index-url", install_torch.CPU_INDEX,
                            "--timeout", "15", "--retries", "1"]
    assert "cpu build" in capsys.readouterr().out


def test_main_falls_back_to_the_ordinary_index_when_the_cpu_index_is_away(no_gpu_linux, monkeypatch, capsys):
    monkeypatch.setattr(install_torch, "index_reachable", lambda url: False)
    pip = Pip()
    assert install_torch.main(run=pip) == 0
    assert [index_of(c) for c in pip.commands] == [None]  # pip was never sent to the unreachable index
    assert "cannot be reached; falling back" in capsys.readouterr().out


def test_main_falls_back_when_pip_fails_on_the_cpu_index(no_gpu_linux, monkeypatch):
    monkeypatch.setattr(install_torch, "index_reachable", lambda url: True)
    pip = Pip(failing=(install_torch.CPU_INDEX,))
    assert install_torch.main(run=pip) == 0
    assert [index_of(c) for c in pip.commands] == [install_torch.CPU_INDEX, None]


def test_main_replaces_the_other_build_of_the_same_version(no_gpu_linux, monkeypatch):
    monkeypatch.setattr(install_torch, "installed_torch", lambda: "2.13.0")  # the CUDA build
    monkeypatch.setattr(install_torch, "index_reachable", lambda url: True)
    pip = Pip()
    assert install_torch.main(run=pip) == 0
    assert "--force-reinstall" in pip.commands[0]


def test_main_leaves_a_matching_install_alone(no_gpu_linux, monkeypatch):
    monkeypatch.setattr(install_torch, "installed_torch", lambda: "2.13.0+cpu")
    pip = Pip()
    assert install_torch.main(run=pip) == 0
    assert pip.commands == []


def test_main_reports_pip_failure(no_gpu_linux, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_BUILD", "default")
    pip = Pip(failing=("torch==2.13.0",))
    assert install_torch.main(run=pip) == 1
    assert "pip failed to install torch 2.13.0" in capsys.readouterr().err


def test_main_rejects_a_bad_override(no_gpu_linux, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_BUILD", "gpu")
    assert install_torch.main(run=Pip()) == 2
    assert "TORCH_BUILD='gpu'" in capsys.readouterr().err
