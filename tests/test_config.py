"""helpers.config: settings in one place, folders relative to the repository, safe concurrent writes."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
from pathlib import Path

import pytest

from helpers import config

ROOT = config.REPO_ROOT
HELPERS = ROOT / "helpers"


def documented(text: str) -> set[str]:
    """Variable names in the first column of a markdown table."""
    cells = re.findall(r"^\|([^|]+)\|", text, flags=re.MULTILINE)
    return {name for cell in cells for name in re.findall(r"`?\b([A-Z][A-Z0-9_]+)\b`?", cell)
            if re.fullmatch(r"\s*`?[A-Z][A-Z0-9_]+`?(\s*,\s*`?[A-Z][A-Z0-9_]+`?)*\s*", cell)}


def test_every_environment_variable_is_read_in_config_and_documented():
    code = {path: path.read_text() for path in HELPERS.rglob("*.py")}
    read_elsewhere = [path.name for path, text in code.items() if path.name != "config.py"
                      and ("os.environ" in text or "getenv" in text)]
    assert not read_elsewhere, f"environment read outside helpers/config.py: {read_elsewhere}"
    in_config = set(re.findall(r'(?:_env|env_list|_seconds)\("([A-Z0-9_]+)"', code[HELPERS / "config.py"]))
    in_config |= set(config.TORCHRUN_VARIABLES)  # read in a loop: _env(name) for name in TORCHRUN_VARIABLES
    table = documented(config.__doc__)
    assert table == in_config | {"TIKTOKEN_CACHE_DIR"}, "config's table and the variables config reads differ"
    readme = (ROOT / "README.md").read_text()
    settings = readme[readme.index("## Settings"):].split("\n## ", 1)[0]
    install_only = {"TORCH_BUILD"}  # read by scripts/install_torch.py when the environment is made, not by helpers
    assert documented(settings) == table | install_only, "the README's settings table and config's table differ"


def test_relative_folders_are_relative_to_the_repository(monkeypatch, tmp_path):
    target = tmp_path / "course data"
    monkeypatch.setenv("COURSE_DATA_DIR", os.path.relpath(target, ROOT))
    monkeypatch.setenv("COURSE_OUTPUT_DIR", os.path.relpath(tmp_path / "out", ROOT))
    elsewhere = tmp_path / "notebooks"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a notebook runs in notebooks/, a script in the repository
    assert config.data_dir().resolve() == target.resolve() and target.is_dir()
    assert config.output_dir().resolve() == (tmp_path / "out").resolve()


def test_atomic_path_replaces_whole_files_and_cleans_up(tmp_path):
    target = tmp_path / "file.txt"
    config.atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with config.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]
    with config.atomic_path(target) as first, config.atomic_path(target) as second:
        assert first != second  # two writers never share a temporary file
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # the outer block finished last


def _record_many(path: str, worker: int, n: int, start) -> None:
    start.wait()  # all writers begin together
    for i in range(n):
        config.record_metrics({f"worker{worker}": {f"step{i}": i}}, Path(path))


def test_concurrent_record_metrics_keep_every_update(tmp_path):
    path = tmp_path / "metrics.json"
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_record_many, args=(str(path), w, 150, start)) for w in range(4)]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    record = json.loads(path.read_text())
    assert {k: len(v) for k, v in record.items()} == {f"worker{w}": 150 for w in range(4)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "metrics.json.lock"]


def test_file_lock_waits_for_the_holder(tmp_path):
    target = tmp_path / "x"
    with config.file_lock(target):
        context = multiprocessing.get_context("spawn")
        other = context.Process(target=_hold_lock_briefly, args=(str(target),))
        other.start()
        other.join(timeout=60)
        assert other.exitcode == 3  # it could not take the lock while we held it
    with config.file_lock(target, timeout=1):
        pass  # free again


def _hold_lock_briefly(target: str) -> None:
    try:
        with config.file_lock(target, timeout=0.3):
            raise SystemExit(0)
    except TimeoutError:
        raise SystemExit(3)
