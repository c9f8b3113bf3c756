"""Verified, cached downloads: one function, ``download_file``, for every file the course fetches.

What it guarantees:
* streaming with a byte progress bar (``tqdm.auto``), socket timeouts, retries with backoff;
* mirrors tried in order; a 4xx answer moves on to the next mirror at once;
* the body length is checked against ``Content-Length`` (a truncated body is an error);
* SHA-256 (and/or a custom ``verify`` check) *before* the file gets its final name:
  the file is written to a temporary name in the same folder and renamed only when valid,
  so an interrupted or corrupt download never leaves a file that later looks valid;
* a cached file is reused only after it verifies again;
* when everything fails, ``DownloadError`` names every URL tried, why it failed,
  and how to place the file by hand. Nothing is printed-and-ignored.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

USER_AGENT = "llm-finetuning-course/1.0 (+python urllib)"
CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """Every URL failed; the message says what happened and what to do."""


class IntegrityError(ValueError):
    """A file's bytes are not the expected ones (checksum or structure)."""


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: Path, sha256: str | None = None, verify: Callable[[Path], None] | None = None) -> None:
    """Raise ``IntegrityError`` unless ``path`` has the expected SHA-256 and passes ``verify``."""
    if sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256.lower():
            raise IntegrityError(f"SHA-256 mismatch for {path.name}: expected {sha256}, got {actual}")
    if verify is not None:
        try:
            verify(path)
        except IntegrityError:
            raise
        except Exception as exc:  # a verify hook may raise anything; report it uniformly
            raise IntegrityError(f"{path.name} failed its integrity check: {exc}") from exc


def is_valid(path: Path, sha256: str | None = None, verify: Callable[[Path], None] | None = None) -> bool:
    """True when ``path`` exists and passes ``check_file``."""
    if not path.is_file():
        return False
    try:
        check_file(path, sha256, verify)
    except IntegrityError:
        return False
    return True


def _fetch_once(url: str, tmp: Path, timeout: float, desc: str) -> None:
    """Stream one URL into ``tmp``; raise on HTTP errors, timeouts and short bodies."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # timeout: connect and each read
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with open(tmp, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False
        ) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise IOError(f"truncated body: received {received} of {total} bytes")


def _is_permanent(exc: Exception) -> bool:
    """HTTP 4xx (except 408/429) will not get better by retrying the same URL."""
    return isinstance(exc, urllib.error.HTTPError) and 400 <= exc.code < 500 and exc.code not in (408, 429)


def _describe(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot connect ({exc.reason})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def download_file(
    urls: str | Sequence[str],
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    verify: Callable[[Path], None] | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    desc: str | None = None,
) -> Path:
    """Return ``dest`` holding a verified copy of the file, downloading it if needed.

    Args:
        urls: one URL or mirrors in order of preference.
        dest: final path of the file (its folder is created).
        sha256: expected hex digest of the downloaded bytes, if known.
        verify: extra check ``verify(path)`` that raises when the file is unusable
            (e.g. "the zip must contain a file with this checksum").
        timeout: seconds allowed to connect and for each read.
        retries: attempts per URL for transient errors (timeouts, 5xx, short bodies).
        backoff: seconds before the 2nd attempt; doubles after each failure.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if is_valid(dest, sha256, verify):
            return dest
        dest.unlink()  # a stale or corrupt cache entry: fetch again
    if not urls:
        raise DownloadError(f"No URL given for {dest.name}. {_by_hand(dest, sha256)}")

    failures: list[str] = []
    for url in urls:
        for attempt in range(1, retries + 1):
            fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                _fetch_once(url, tmp, timeout, desc or dest.name)
                check_file(tmp, sha256, verify)
                tmp.replace(dest)  # atomic on the same filesystem
                return dest
            except IntegrityError as exc:
                failures.append(f"{url}: {exc}")
                break  # same bytes again would fail again: next mirror
            except Exception as exc:  # network trouble: retry, unless permanent
                failures.append(f"{url} (attempt {attempt}/{retries}): {_describe(exc)}")
                if _is_permanent(exc):
                    break
                if attempt < retries:
                    time.sleep(backoff * 2 ** (attempt - 1))
            finally:
                tmp.unlink(missing_ok=True)
    tried = "\n  - ".join(failures)
    raise DownloadError(f"Could not download {dest.name}. Tried:\n  - {tried}\n{_by_hand(dest, sha256)}")


def _by_hand(dest: Path, sha256: str | None) -> str:
    check = f" (its SHA-256 must be {sha256})" if sha256 else ""
    return (
        f"To fix: check your internet connection or proxy and run again, or download the file "
        f"yourself and place it at {dest}{check}."
    )


# --- The SMS Spam Collection (UCI ML Repository, dataset 228; CC BY 4.0) ------------------------------

SMS_SPAM_URLS = [
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "https://archive.ics.uci.edu/ml/machine-learning-databases/00228/smsspamcollection.zip",
    # A byte-identical copy of the original zip in a public GitHub repository, pinned to a commit.
    "https://raw.githubusercontent.com/pratik-kale20/dataset/3a3f2cb6fb79dedf2b7de64a2ba9f51ad8891a33/smsspamcollection.zip",
]
# SHA-256 of the extracted `SMSSpamCollection` file (not of the zip, so re-zipped mirrors still pass).
SMS_SPAM_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
SMS_SPAM_MEMBER = "SMSSpamCollection"


def _zip_member(zip_path: Path, name: str) -> str:
    """The archive path of the member called ``name`` (at any depth) in a zip."""
    import zipfile

    with zipfile.ZipFile(zip_path) as archive:
        matches = [m for m in archive.namelist() if m.rsplit("/", 1)[-1] == name]
    if not matches:
        raise IntegrityError(f"{zip_path.name} holds no file called {name!r}")
    return matches[0]


def _zip_member_sha256(zip_path: Path, name: str) -> str:
    import zipfile

    digest = hashlib.sha256()
    with zipfile.ZipFile(zip_path) as archive, archive.open(_zip_member(zip_path, name)) as member:
        for block in iter(lambda: member.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sms_spam(urls: Sequence[str] | None = None, folder: Path | None = None,
                      sha256: str | None = None) -> Path:
    """Return the path of a verified ``SMSSpamCollection`` file, downloading and extracting it if needed.

    Defaults come from the environment: ``SMS_SPAM_URLS`` (comma-separated mirrors), ``COURSE_DATA_DIR``
    and ``SMS_SPAM_SHA256`` (only for testing with a different file). A verified file already in the
    cache is used without any network access.
    """
    from . import config

    urls = list(urls) if urls is not None else config.env_list("SMS_SPAM_URLS", SMS_SPAM_URLS)
    folder = Path(folder) if folder is not None else config.data_dir() / "sms_spam_collection"
    expected = (sha256 or os.environ.get("SMS_SPAM_SHA256") or SMS_SPAM_SHA256).lower()
    target = folder / SMS_SPAM_MEMBER
    if is_valid(target, expected):
        return target

    def member_ok(zip_path: Path) -> None:
        actual = _zip_member_sha256(zip_path, SMS_SPAM_MEMBER)
        if actual != expected:
            raise IntegrityError(f"{SMS_SPAM_MEMBER} inside the zip has SHA-256 {actual}, expected {expected}")

    zip_path = download_file(urls, folder / "smsspamcollection.zip", verify=member_ok,
                             desc="SMS Spam Collection")
    _extract_atomically(zip_path, SMS_SPAM_MEMBER, target)
    check_file(target, expected)
    return target


def _extract_atomically(zip_path: Path, name: str, target: Path) -> None:
    """Copy one zip member to ``target`` through a temporary file and a rename."""
    import shutil
    import zipfile

    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(zip_path) as archive, \
                archive.open(_zip_member(zip_path, name)) as member:
            shutil.copyfileobj(member, out)
        Path(tmp_name).replace(target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
