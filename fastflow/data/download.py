"""Download the official MVTec AD archive, verify its SHA-256 and extract it (needs internet)."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from fastflow.data.paper import MVTEC_CATEGORIES

log = logging.getLogger(__name__)

MVTEC_URL = ("https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
             "420938113-1629952094/mvtec_anomaly_detection.tar.xz")
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"  # as recorded by anomalib
MVTEC_BYTES = 5_264_982_680


class DownloadError(RuntimeError):
    """The archive could not be fetched or failed verification."""


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, target: Path, timeout: float = 30.0) -> None:
    """Stream `url` to `target` (a .part file first) with a progress bar."""
    part = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or MVTEC_BYTES)
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        part.unlink(missing_ok=True)
        raise DownloadError(f"cannot download MVTec AD ({getattr(error, 'reason', error)}); download "
                            f"{url} by hand, extract it and set MVTEC_ROOT to the folder holding bottle/, cable/, ...") from None
    part.rename(target)


def download_mvtec(root: Path, url: str = MVTEC_URL, expected_sha256: str = MVTEC_SHA256) -> Path:
    """Fetch (unless already there), verify and extract into `root`; returns `root`."""
    root = Path(root)
    if all((root / category / "train").is_dir() for category in MVTEC_CATEGORIES):
        log.info("MVTec AD already present under %s", root)
        return root
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "mvtec_anomaly_detection.tar.xz"
    if not archive.is_file():
        fetch(url, archive)
    actual = sha256_of(archive)
    if actual != expected_sha256:
        bad = archive.with_suffix(".xz.bad")
        shutil.move(archive, bad)
        raise DownloadError(f"{archive}: SHA-256 {actual} does not match the official {expected_sha256}; "
                            f"moved to {bad}, nothing extracted")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root
