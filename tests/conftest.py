"""Test setup: everything offline, notebooks and exercise solutions run unchanged in the fast ``smoke`` profile.

It applies when pytest is given ``tests`` (or ``tests/conftest.py``) too, as ``make test`` does:
``pytest --nbval-lax --nbval-current-env tests/conftest.py solutions/`` runs the solutions alone in this profile.

At start-up (before any notebook kernel starts, so kernels inherit it) this sets:
* ``COURSE_PROFILE=smoke``, ``COURSE_DATA_DIR`` / ``COURSE_OUTPUT_DIR`` in a temporary folder;
* a local HTTP server on 127.0.0.1 serving the SMS Spam zip — the real one from ``../shared/data``
  when present, else a synthetic zip in the original layout (``SMS_SPAM_SHA256`` then names its hash);
  and ``instruction-data.json`` the same way (``INSTRUCTION_DATA_URLS``, ``INSTRUCTION_DATA_SHA256``);
* ``TIKTOKEN_CACHE_DIR`` primed with GPT-2's BPE files from ``../shared`` when it is not set already;
* ``COURSE_MODEL`` = a tiny random GPT-2 checkpoint in the real on-disk format (unless already set).
"""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(TESTS))

from httpserver import LocalServer  # noqa: E402
from synthetic import synthetic_instruction_data, synthetic_sms_zip  # noqa: E402

TIKTOKEN_FILES = {  # SHA-1 of the URL -> file name (tiktoken's cache layout)
    "6d1cbeee0f20b3d9449abfede4726ed8212e3aee": "vocab.bpe",
    "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6": "encoder.json",
}
WORK = Path(tempfile.mkdtemp(prefix="course-tests-"))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)
SERVER = LocalServer().__enter__()


def sms_zip_bytes() -> tuple[bytes, str | None]:
    """The real zip from ../shared (hash None = the course default) or a synthetic one and its member hash."""
    real = SHARED / "smsspamcollection.zip"
    if real.is_file():
        return real.read_bytes(), None
    data, member = synthetic_sms_zip()
    return data, hashlib.sha256(member).hexdigest()


def instruction_data_bytes() -> tuple[bytes, str | None]:
    """The book's instruction-data.json from ../shared (hash None = the course default) or a synthetic one and its hash."""
    real = SHARED / "instruction-data.json"
    if real.is_file():
        return real.read_bytes(), None
    data = synthetic_instruction_data()
    return data, hashlib.sha256(data).hexdigest()


def _prime_tiktoken() -> None:
    if os.environ.get("TIKTOKEN_CACHE_DIR") or not (SHARED / "gpt2_bpe").is_dir():
        return
    cache = WORK / "tiktoken"
    cache.mkdir()
    for key, name in TIKTOKEN_FILES.items():
        shutil.copy(SHARED / "gpt2_bpe" / name, cache / key)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


def tokenizer_available() -> bool:
    """GPT-2's tokenizer files are in tiktoken's cache or can be downloaded."""
    try:
        import tiktoken

        tiktoken.get_encoding("gpt2")
        return True
    except Exception:
        return False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--lab-screenshot", metavar="PATH", default=None,
                     help="also save the JupyterLab browser test's screenshot here "
                          "(e.g. images/jupyterlab_classifier.png)")


def pytest_configure(config: pytest.Config) -> None:
    zip_bytes, member_sha = sms_zip_bytes()
    os.environ["SMS_SPAM_URLS"] = SERVER.add("/smsspamcollection.zip", zip_bytes)
    if member_sha:
        os.environ["SMS_SPAM_SHA256"] = member_sha
    instructions, instructions_sha = instruction_data_bytes()
    os.environ["INSTRUCTION_DATA_URLS"] = SERVER.add("/instruction-data.json", instructions)
    if instructions_sha:
        os.environ["INSTRUCTION_DATA_SHA256"] = instructions_sha
    os.environ["COURSE_PROFILE"] = "smoke"
    os.environ["COURSE_DATA_DIR"] = str(WORK / "data")
    os.environ["COURSE_OUTPUT_DIR"] = str(WORK / "outputs")
    os.environ.setdefault("MPLBACKEND", "Agg")
    _prime_tiktoken()
    if "COURSE_MODEL" not in os.environ:
        from hf_checkpoints import make_gpt2_checkpoint

        os.environ["COURSE_MODEL"] = str(make_gpt2_checkpoint(WORK / "tiny-gpt2"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if tokenizer_available():
        return
    skip = pytest.mark.skip(reason="GPT-2's tokenizer files are neither in TIKTOKEN_CACHE_DIR nor downloadable "
                                   "(offline without ../shared/data/gpt2_bpe)")
    for item in items:
        if "needs_tokenizer" in item.keywords or (item.fspath.ext == ".ipynb" and item.fspath.basename >= "03"):
            item.add_marker(skip)


@pytest.fixture
def server() -> LocalServer:
    """A fresh local HTTP server for one test."""
    with LocalServer() as local:
        yield local


@pytest.fixture
def sms_zip() -> tuple[bytes, str | None]:
    """(zip bytes, expected member SHA-256 or None for the course default)."""
    return sms_zip_bytes()


@pytest.fixture
def tokenizer():
    """GPT-2's tokenizer, or a skip with the reason when its files are unavailable."""
    if not tokenizer_available():
        pytest.skip("GPT-2's tokenizer files are neither cached nor downloadable")
    from helpers.models.gpt2 import gpt2_tokenizer

    return gpt2_tokenizer()
