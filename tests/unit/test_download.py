"""MVTec download: checksum verification and extraction, exercised with a local file:// archive."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from fastflow.data.download import DownloadError, download_mvtec, sha256_of


def make_archive(tmp_path: Path) -> Path:
    source = tmp_path / "src" / "bottle" / "train" / "good"
    source.mkdir(parents=True)
    (source / "000.png").write_bytes(b"not really a png")
    archive = tmp_path / "mvtec.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "src" / "bottle", arcname="bottle")
    return archive


def test_verified_archive_is_extracted(tmp_path: Path):
    archive = make_archive(tmp_path)
    root = download_mvtec(tmp_path / "data", url=archive.as_uri(), expected_sha256=sha256_of(archive))
    assert (root / "bottle" / "train" / "good" / "000.png").read_bytes() == b"not really a png"


def test_checksum_mismatch_extracts_nothing(tmp_path: Path):
    archive = make_archive(tmp_path)
    with pytest.raises(DownloadError, match="SHA-256"):
        download_mvtec(tmp_path / "data", url=archive.as_uri(), expected_sha256="0" * 64)
    assert not (tmp_path / "data" / "bottle").exists()
    assert (tmp_path / "data" / "mvtec_anomaly_detection.tar.xz.bad").is_file()


def test_unreachable_url_fails_in_one_line(tmp_path: Path):
    with pytest.raises(DownloadError) as error:
        download_mvtec(tmp_path / "data", url=(tmp_path / "missing.tar.xz").as_uri())
    assert "MVTEC_ROOT" in str(error.value) and "\n" not in str(error.value)
