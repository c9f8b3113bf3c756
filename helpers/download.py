"""Verified, cached downloads: one function, ``download_file``, for every file the course fetches.

What it guarantees:
* each attempt prints which URL it tries; the body streams with a byte progress bar (``tqdm.auto``);
* two timeouts and no overall deadline (GPT-2 XL is 6.4 GB): ``connect_timeout`` to connect and get the
  response headers, ``stall_timeout`` for the body, which stalls when less than 64 KiB arrive in that time
  (a silent server, or one that trickles a byte now and then); defaults from ``config``;
* mirrors tried in order; transient errors (timeouts, 5xx, short bodies) are retried with backoff; errors
  that cannot heal are not: a 4xx answer, a redirect loop or an unknown URL scheme moves on to the next
  mirror at once, a full disk stops at once;
* the body length is checked against ``Content-Length`` (a truncated body is an error);
* SHA-256 (and/or a custom ``verify`` check) *before* the file gets its final name:
  the file is written to a temporary name in the same folder and renamed only when valid,
  so an interrupted or corrupt download never leaves a file that later looks valid;
  temporary files that a killed run left behind (older than an hour) are removed;
* a cached file is reused only after it verifies again; one that fails (perhaps placed by hand) is moved
  aside to ``<name>.invalid``, never deleted;
* downloaded files get mode 0644 (owner writes, everyone reads; the umask is not applied): the files are
  public data, and a classroom may share one data folder;
* when everything fails, ``DownloadError`` names every URL tried, why it failed,
  and how to place the file by hand. Nothing is printed-and-ignored.
"""
from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tqdm.auto import tqdm

from . import config

USER_AGENT = "llm-finetuning-course/1.0 (+python urllib)"
CHUNK = 1 << 16  # bytes per read; also the least that must arrive per stall_timeout
FILE_MODE = 0o644  # rw-r--r--: readable by the group (a shared classroom data folder)
STALE_PART_SECONDS = 3600  # a temporary file untouched this long belongs to a killed run
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # no space, or over quota


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


def reuse_cached(path: Path, sha256: str | None = None, verify: Callable[[Path], None] | None = None) -> bool:
    """True when ``path`` holds a file that passes ``check_file``.

    A file that fails (perhaps one the user placed by hand) is moved aside to ``<name>.invalid``, never
    deleted, and the user is told its SHA-256.
    """
    if not path.is_file():
        return False
    try:
        check_file(path, sha256, verify)
        return True
    except IntegrityError as exc:
        digest = sha256_of(path)
        aside = path.with_name(f"{path.name}.invalid")
        if aside.exists():  # keep an earlier one too: a different name per content
            aside = path.with_name(f"{path.name}.{digest[:12]}.invalid")
        path.replace(aside)
        print(f"{path} failed verification ({exc}). Its SHA-256 is {digest}. "
              f"Moved it to {aside} (not deleted); fetching a fresh copy.", flush=True)
        return False


def remove_stale_parts(dest: Path) -> None:
    """Delete ``dest``'s temporary files (``.<name>.*.part``) that a killed run left behind.

    Only files untouched for an hour: a download running in another process (a classroom may share
    the folder) writes to its file at least every ``stall_timeout`` seconds or fails, and verifying
    even GPT-2 XL's 6.4 GB takes minutes, not an hour.
    """
    for part in dest.parent.glob(f".{dest.name}.*.part"):
        try:
            if time.time() - part.stat().st_mtime > STALE_PART_SECONDS:
                part.unlink()
        except OSError:  # gone meanwhile, or another user's file in a shared folder
            pass


def _publish(tmp: Path, dest: Path) -> None:
    """Give a verified temporary file its final name and mode (mkstemp creates files as 0600)."""
    os.chmod(tmp, FILE_MODE)
    tmp.replace(dest)  # atomic on the same filesystem


def _body(response, stall_timeout: float) -> Iterator[bytes]:
    """Yield the response body as it arrives; raise ``TimeoutError`` when it stalls.

    Stalled: less than ``CHUNK`` bytes in ``stall_timeout`` seconds. ``read1`` makes one socket read,
    which waits at most ``stall_timeout`` for a silent server; the byte count catches a trickling one.
    """
    stalled = TimeoutError(f"stalled: less than {CHUNK // 1024} KiB arrived in {stall_timeout:g} s")
    window_start, window_bytes = time.monotonic(), 0
    while True:
        try:
            chunk = response.read1(CHUNK)
        except TimeoutError:
            raise stalled from None
        if not chunk:
            return
        yield chunk
        window_bytes += len(chunk)
        if window_bytes >= CHUNK:
            window_start, window_bytes = time.monotonic(), 0
        elif time.monotonic() - window_start > stall_timeout:
            raise stalled


def _fetch_once(url: str, tmp: Path, connect_timeout: float, stall_timeout: float, desc: str) -> None:
    """Stream one URL into ``tmp``; raise on HTTP errors, timeouts and short bodies."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:  # urllib's timeout covers connecting and waiting for the response headers
        response = urllib.request.urlopen(request, timeout=connect_timeout)
    except TimeoutError:
        raise TimeoutError(f"timed out: no answer within {connect_timeout:g} s") from None
    with response:
        # Then each body read may wait stall_timeout. urllib has no public handle on the socket: reach it
        # through the response's reader (http.client's layout since Python 3.0; None for file:// URLs).
        sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
        if sock is not None:
            sock.settimeout(stall_timeout)
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with open(tmp, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False
        ) as bar:
            for chunk in _body(response, stall_timeout):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise IOError(f"truncated body: received {received} of {total} bytes")


def _is_permanent(exc: Exception) -> bool:
    """Errors that retrying the same URL cannot heal.

    HTTP 3xx (a redirect loop, or a redirect urllib will not follow) and 4xx (except 408/429), an unknown
    URL scheme or a malformed URL (urllib's ``ValueError``).
    """
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code < 500 and exc.code not in (408, 429)
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason).startswith("unknown url type")
    return isinstance(exc, ValueError)


def _describe(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {str(exc.reason).splitlines()[0]}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot connect ({exc.reason})"
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"
    return f"{type(exc).__name__}: {exc}"


def _download_to(url: str, dest: Path, sha256: str | None, verify: Callable[[Path], None] | None,
                 connect_timeout: float, stall_timeout: float, desc: str) -> None:
    """One attempt: fetch into a temporary file beside ``dest``, verify it, then publish it as ``dest``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _fetch_once(url, tmp, connect_timeout, stall_timeout, desc)
        check_file(tmp, sha256, verify)
        _publish(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download_file(
    urls: str | Sequence[str],
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    verify: Callable[[Path], None] | None = None,
    connect_timeout: float | None = None,
    stall_timeout: float | None = None,
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
        connect_timeout: seconds to connect and receive the response headers
            (default ``config.connect_timeout()``, 15 s).
        stall_timeout: the body fails when less than 64 KiB arrive in this many seconds
            (default ``config.stall_timeout()``, 30 s). There is no overall deadline.
        retries: attempts per URL for transient errors (timeouts, 5xx, short bodies).
        backoff: seconds before the 2nd attempt; doubles after each failure.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    dest = Path(dest)
    desc = desc or dest.name
    connect_timeout = config.connect_timeout() if connect_timeout is None else connect_timeout
    stall_timeout = config.stall_timeout() if stall_timeout is None else stall_timeout
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(dest)
    if reuse_cached(dest, sha256, verify):
        return dest
    if not urls:
        raise DownloadError(f"No URL given for {dest.name}. {_by_hand(dest, sha256)}")

    failures: list[str] = []
    for url in urls:
        for attempt in range(1, retries + 1):
            print(f"downloading {desc} from {url} (attempt {attempt}/{retries})", flush=True)
            try:
                _download_to(url, dest, sha256, verify, connect_timeout, stall_timeout, desc)
                return dest
            except IntegrityError as exc:
                failures.append(f"{url}: {exc}")
                print(f"  failed: {exc}", flush=True)
                break  # same bytes again would fail again: next mirror
            except Exception as exc:  # network trouble: retry, unless it cannot heal
                if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                    raise DownloadError(
                        f"Could not save {dest.name}: no space left in {dest.parent} ({exc.strerror}). "
                        f"Free some space, or set COURSE_DATA_DIR to a folder on a bigger disk, "
                        f"and run again.") from exc
                why = _describe(exc)
                failures.append(f"{url} (attempt {attempt}/{retries}): {why}")
                print(f"  failed: {why}", flush=True)
                if _is_permanent(exc):
                    break
                if attempt < retries:
                    time.sleep(backoff * 2 ** (attempt - 1))
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
    cache is used without any network access; a file there that fails the check is moved aside.
    """
    urls = list(urls) if urls is not None else config.sms_spam_urls(SMS_SPAM_URLS)
    folder = Path(folder) if folder is not None else config.data_dir() / "sms_spam_collection"
    expected = (sha256 or config.sms_spam_sha256(SMS_SPAM_SHA256)).lower()
    target = folder / SMS_SPAM_MEMBER
    if reuse_cached(target, expected):
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

    remove_stale_parts(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(zip_path) as archive, \
                archive.open(_zip_member(zip_path, name)) as member:
            shutil.copyfileobj(member, out)
        _publish(Path(tmp_name), target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
