"""helpers.download against a local HTTP server: success, mirrors, faults, checksums, cache."""
from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

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
        download_file(url, tmp_path / "f.bin", timeout=0.2, retries=2, backoff=0)
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


def test_corrupt_cache_is_replaced(server, tmp_path):
    (tmp_path / "f.bin").write_bytes(b"half a file")
    url = server.add("/f.bin", PAYLOAD)
    assert download_file(url, tmp_path / "f.bin", sha256=SHA).read_bytes() == PAYLOAD


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
