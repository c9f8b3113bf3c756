"""helpers.download against a local HTTP server: success, mirrors, faults, checksums, cache."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import sys
import time
import zipfile
from pathlib import Path

import pytest
from httpserver import silent_server

from helpers import config, download
from helpers.download import (DownloadError, IntegrityError, download_file, download_sms_spam,
                              sha256_of)

PAYLOAD = b"spam and ham\n" * 5000
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_success_writes_verified_file(server, tmp_path):
    url = server.add("/f.bin", PAYLOAD)
    path = download_file(url, tmp_path / "f.bin", sha256=SHA)
    assert path.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == ["f.bin"]


def test_primary_down_falls_back_to_mirror(server, tmp_path):
    dead = "http://127.0.0.1:9/f.bin"  # nothing listens on the discard port
    mirror = server.add("/mirror/f.bin", PAYLOAD)
    path = download_file([dead, mirror], tmp_path / "f.bin", sha256=SHA, retries=1)
    assert sha256_of(path) == SHA


def test_404_is_not_retried_and_error_names_every_url(server, tmp_path):
    missing, also_missing = server.url("/missing"), server.url("/gone")
    with pytest.raises(DownloadError) as info:
        download_file([missing, also_missing], tmp_path / "f.bin", sha256=SHA, retries=3, backoff=0)
    message = str(info.value)
    assert missing in message and also_missing in message and "HTTP 404" in message
    assert "place it at" in message and SHA in message  # says how to fix it by hand
    assert server.hits["/missing"] == 1  # a 404 does not get better by retrying
    assert leftovers(tmp_path) == []


def test_timeout_retries_then_fails_cleanly(server, tmp_path):
    url = server.add("/slow", PAYLOAD, delay=1.0)
    with pytest.raises(DownloadError, match="timed out"):
        download_file(url, tmp_path / "f.bin", connect_timeout=0.2, retries=2, backoff=0)
    assert server.hits["/slow"] == 2
    assert leftovers(tmp_path) == []


def test_truncated_body_is_an_error_not_a_file(server, tmp_path):
    url = server.add("/short", PAYLOAD, truncate_to=1000)
    with pytest.raises(DownloadError, match="truncated|IncompleteRead"):
        download_file(url, tmp_path / "f.bin", retries=2, backoff=0)
    assert leftovers(tmp_path) == []


def test_checksum_mismatch_caches_nothing(server, tmp_path):
    url = server.add("/f.bin", PAYLOAD + b"tampered")
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        download_file(url, tmp_path / "f.bin", sha256=SHA)
    assert leftovers(tmp_path) == []


def test_second_call_uses_cache_without_network(server, tmp_path):
    url = server.add("/f.bin", PAYLOAD)
    download_file(url, tmp_path / "f.bin", sha256=SHA)
    assert download_file("http://127.0.0.1:9/unreachable", tmp_path / "f.bin", sha256=SHA).exists()
    assert server.hits["/f.bin"] == 1


def test_invalid_file_in_place_is_moved_aside_never_deleted(server, tmp_path, capsys):
    url = server.add("/f.bin", PAYLOAD)
    for placed_by_hand in (b"half a file", b"another wrong file"):
        (tmp_path / "f.bin").write_bytes(placed_by_hand)
        assert download_file(url, tmp_path / "f.bin", sha256=SHA).read_bytes() == PAYLOAD
        assert hashlib.sha256(placed_by_hand).hexdigest() in capsys.readouterr().out  # told which file it was
    assert (tmp_path / "f.bin.invalid").read_bytes() == b"half a file"
    assert sorted(p.read_bytes() for p in tmp_path.glob("f.bin*.invalid")) == [b"another wrong file", b"half a file"]


def test_sms_file_placed_by_hand_is_moved_aside(server, tmp_path, sms_zip):
    data, member_sha = sms_zip
    (tmp_path / "SMSSpamCollection").write_bytes(b"ham\thello\n")
    path = download_sms_spam([server.add("/sms.zip", data)], tmp_path, sha256=member_sha)
    assert path.stat().st_size > 100_000
    assert (tmp_path / "SMSSpamCollection.invalid").read_bytes() == b"ham\thello\n"


def test_verify_hook_rejects_bad_structure(server, tmp_path):
    def must_be_zip(path: Path) -> None:
        zipfile.ZipFile(path).close()

    url = server.add("/not.zip", PAYLOAD)
    with pytest.raises(DownloadError, match="integrity check"):
        download_file(url, tmp_path / "a.zip", verify=must_be_zip)
    assert leftovers(tmp_path) == []


def test_sms_spam_download_extracts_and_verifies(server, tmp_path, sms_zip):
    data, member_sha = sms_zip
    url = server.add("/sms.zip", data)
    path = download_sms_spam([server.url("/down.zip"), url], tmp_path, sha256=member_sha)
    assert path.name == "SMSSpamCollection" and path.stat().st_size > 100_000
    # Second call: served from the verified cache, no request at all.
    assert download_sms_spam(["http://127.0.0.1:9/x.zip"], tmp_path, sha256=member_sha) == path
    assert server.hits["/sms.zip"] == 1


def test_sms_spam_wrong_content_is_rejected(server, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("SMSSpamCollection", "ham\tnot the real data\n")
    url = server.add("/fake.zip", buffer.getvalue())
    with pytest.raises(DownloadError, match="SMSSpamCollection inside the zip has SHA-256"):
        download_sms_spam([url], tmp_path)
    assert leftovers(tmp_path) == []


# --- Timeouts, errors that cannot heal, leftovers, permissions ----------------------------------------


def test_each_attempt_prints_its_url(server, tmp_path, capsys):
    url = server.add("/f.bin", PAYLOAD)
    download_file(["http://127.0.0.1:9/f.bin", url], tmp_path / "f.bin", retries=1, desc="the file")
    out = capsys.readouterr().out
    assert "downloading the file from http://127.0.0.1:9/f.bin (attempt 1/1)" in out
    assert f"downloading the file from {url} (attempt 1/1)" in out


def test_server_that_never_answers_fails_after_connect_timeout(tmp_path):
    start = time.monotonic()
    with silent_server() as url, pytest.raises(DownloadError, match="no answer within 0.3 s"):
        download_file(url, tmp_path / "f.bin", connect_timeout=0.3, stall_timeout=60, retries=2, backoff=0)
    assert time.monotonic() - start < 3  # 2 attempts of 0.3 s (the stall timeout plays no part)
    assert leftovers(tmp_path) == []


def test_silent_body_fails_after_stall_timeout(server, tmp_path):
    url = server.add("/f.bin", PAYLOAD, trickle=30.0)  # headers at once, then nothing for 30 s
    start = time.monotonic()
    with pytest.raises(DownloadError, match="stalled"):
        download_file(url, tmp_path / "f.bin", connect_timeout=20, stall_timeout=0.3, retries=1)
    assert time.monotonic() - start < 3  # the body waits stall_timeout, not connect_timeout
    assert leftovers(tmp_path) == []


def test_trickling_body_fails_after_stall_timeout(server, tmp_path):
    # A byte every 0.1 s: each read returns well within the stall timeout, yet the file would take 2 hours.
    url = server.add("/f.bin", PAYLOAD, trickle=0.1)
    start = time.monotonic()
    with pytest.raises(DownloadError, match="stalled: less than 64 KiB arrived in 0.5 s"):
        download_file(url, tmp_path / "f.bin", connect_timeout=20, stall_timeout=0.5, retries=1)
    assert time.monotonic() - start < 3
    assert leftovers(tmp_path) == []


def test_timeouts_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("COURSE_CONNECT_TIMEOUT", raising=False)
    monkeypatch.delenv("COURSE_STALL_TIMEOUT", raising=False)
    assert (config.connect_timeout(), config.stall_timeout()) == (15.0, 30.0)
    monkeypatch.setenv("COURSE_CONNECT_TIMEOUT", "0.25")
    with silent_server() as url, pytest.raises(DownloadError, match="no answer within 0.25 s"):
        download_file(url, tmp_path / "f.bin", retries=1)
    for bad in ("soon", "0", "-1", "inf", "nan"):
        monkeypatch.setenv("COURSE_STALL_TIMEOUT", bad)
        with pytest.raises(ValueError, match="COURSE_STALL_TIMEOUT=.* is not a positive number of seconds"):
            config.stall_timeout()


@pytest.mark.parametrize("kind", ["redirect loop", "unknown scheme", "no scheme"])
def test_errors_that_cannot_heal_are_not_retried(server, tmp_path, kind):
    url = {"redirect loop": server.add("/loop", b"", status=302, headers={"Location": "/loop"}),
           "unknown scheme": "ftp2://example.org/f.bin", "no scheme": "example.org/f.bin"}[kind]
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "f.bin", retries=3, backoff=5)
    message = str(info.value)
    assert f"{url} (attempt 1/3)" in message and "attempt 2/3" not in message
    assert {"redirect loop": "infinite loop", "unknown scheme": "unknown url type",
            "no scheme": "unknown url type"}[kind] in message
    assert time.monotonic() - start < 3  # no backoff sleep, hence no retry
    assert leftovers(tmp_path) == []


def test_disk_full_stops_at_once(server, tmp_path, monkeypatch):
    class FullDisk(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(download, "open", lambda *args, **kwargs: FullDisk(), raising=False)
    first, mirror = server.add("/f.bin", PAYLOAD), server.add("/mirror/f.bin", PAYLOAD)
    with pytest.raises(DownloadError, match="no space left in .*COURSE_DATA_DIR"):
        download_file([first, mirror], tmp_path / "f.bin", retries=3, backoff=5)
    assert server.hits == {"/f.bin": 1}  # neither retried nor another mirror: the disk is still full
    assert leftovers(tmp_path) == []


def test_stale_part_files_of_killed_runs_are_removed(server, tmp_path):
    old, fresh, other = (tmp_path / name for name in (".f.bin.x1.part", ".f.bin.x2.part", ".g.bin.x3.part"))
    for part in (old, fresh, other):
        part.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    for part in (old, other):
        os.utime(part, (two_hours_ago, two_hours_ago))
    download_file(server.add("/f.bin", PAYLOAD), tmp_path / "f.bin", sha256=SHA)
    assert not old.exists()  # a killed run's leftover
    assert fresh.exists() and other.exists()  # perhaps a download running now; another file's


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_downloaded_files_are_readable_by_the_group(server, tmp_path, sms_zip):
    data, member_sha = sms_zip
    umask = os.umask(0o077)  # even for a private umask: these are public files in a shared folder
    try:
        path = download_file(server.add("/f.bin", PAYLOAD), tmp_path / "f.bin", sha256=SHA)
        sms = download_sms_spam([server.add("/sms.zip", data)], tmp_path / "sms", sha256=member_sha)
    finally:
        os.umask(umask)
    for file in (path, sms, tmp_path / "sms" / "smsspamcollection.zip"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file
