"""Download, verify and extract LJSpeech-1.1, which is already in our corpus layout.

The transfer resumes from a ``.part`` file with an HTTP Range request, its size is checked
against the server's length, the archive is checked against the published SHA-256 and is
extracted member by member into a temporary folder (refusing links and paths outside it), which
is renamed into place only when complete: ``root/LJSpeech-1.1`` existing means it is whole.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from ira.data.corpus import METADATA, WAVS, Progress, read_metadata

LJSPEECH_URL = "https://data.keithito.com/data/speech/LJSpeech-1.1.tar.bz2"
LJSPEECH_SHA256 = "be1a30453f28eb8dd26af4101ae40cbf2c50413b1bb21936cbcdc6fae3de8aa5"
"""Published checksum of LJSpeech-1.1.tar.bz2, as listed by torchaudio.datasets.LJSPEECH."""
FOLDER = "LJSpeech-1.1"
ARCHIVE = "LJSpeech-1.1.tar.bz2"
_CHUNK = 1 << 20
# tarfile's own "data" filter (Python >= 3.10.12 / 3.11.4) on top of our member checks.
_DATA_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class DownloadError(RuntimeError):
    """The archive could not be fetched or verified; the message says how to get it by hand."""


def _manual_hint(url: str, root: Path) -> str:
    return (f"Download it by hand (for example `wget -c {url}`), put {ARCHIVE} in {root} "
            f"(or extract it there so that {root / FOLDER / METADATA} exists) and run again")


def _extracted(corpus: Path) -> bool:
    return (corpus / METADATA).is_file() and (corpus / WAVS).is_dir()


def _fetch(url: str, part: Path, timeout: float, progress: Progress | None, share: float) -> None:
    """Download `url` into `part`, continuing from its current size; raise if it ends short."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "ira-data/1.0"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the .part may already be whole
            return
        raise
    with response:
        if have and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                raise DownloadError(f"{url}: the server answered the resume request with the wrong range "
                                    f"({content_range!r}); delete {part} and run again")
            total_text = content_range.rsplit("/", 1)[-1]
            total = int(total_text) if total_text.isdigit() else None
            mode = "ab"
        else:  # 200: the server ignored the Range header, start over
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        done = have
        with open(part, mode) as f:
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                done += len(chunk)
                if progress and total:
                    progress(share * done / total, f"downloading {done / 1e6:.0f} / {total / 1e6:.0f} MB")
    if total is not None and done != total:
        raise DownloadError(f"{url}: the transfer stopped at {done} of {total} bytes; run again to resume "
                            f"from {part}")


def sha256_of(path: Path, progress: Progress | None = None, start: float = 0.0, share: float = 0.0) -> str:
    digest = hashlib.sha256()
    size = max(path.stat().st_size, 1)
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress and done % (64 * _CHUNK) < _CHUNK:
                progress(start + share * done / size, "verifying the checksum")
    return digest.hexdigest()


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Only plain files and folders inside FOLDER/ are extracted."""
    parts = PurePosixPath(member.name).parts
    if member.name.startswith("/") or ".." in parts or not parts or parts[0] != FOLDER:
        raise DownloadError(f"{archive}: refusing to extract {member.name!r}, which is outside {FOLDER}/; "
                            "the archive is not LJSpeech-1.1")
    if not (member.isfile() or member.isdir()):
        raise DownloadError(f"{archive}: refusing to extract {member.name!r}, which is a link or device")


def extract_archive(archive: Path, root: Path, progress: Progress | None = None,
                    start: float = 0.0, share: float = 1.0) -> Path:
    """Extract LJSpeech-1.1.tar.bz2 safely into root/LJSpeech-1.1 (via a temporary folder).

    One streaming pass over the compressed file; progress follows the compressed bytes read.
    """
    tmp = root / f".{FOLDER}.extracting"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    size = max(archive.stat().st_size, 1)
    try:
        with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for i, member in enumerate(tar):
                _check_member(member, archive)
                tar.extract(member, tmp, **_DATA_FILTER)
                if progress and i % 500 == 0:
                    progress(start + share * raw.tell() / size, f"extracting ({i + 1} files)")
    except (tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{archive}: cannot extract ({exc}); the file is damaged, delete it and run again") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not _extracted(tmp / FOLDER):
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{archive}: the archive has no {FOLDER}/{METADATA} and {FOLDER}/{WAVS}/; "
                            "it is not LJSpeech-1.1")
    corpus = root / FOLDER
    if corpus.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{corpus} exists but is incomplete (no {METADATA} or no {WAVS}/); "
                            "delete it and run again")
    (tmp / FOLDER).rename(corpus)
    tmp.rmdir()
    return corpus


def download_ljspeech(root: str | Path, url: str = LJSPEECH_URL, sha256: str | None = LJSPEECH_SHA256,
                      progress: Progress | None = None, timeout: float = 30,
                      keep_archive: bool = True) -> Path:
    """Make sure `root/LJSpeech-1.1` holds the extracted corpus, downloading what is missing.

    Idempotent: an extracted corpus is returned at once; a verified archive is not fetched again;
    an interrupted download continues from `root/LJSpeech-1.1.tar.bz2.part`. `sha256=None`
    skips verification (for a mirror with another file).
    """
    root = Path(root)
    corpus = root / FOLDER
    if _extracted(corpus):
        read_metadata(corpus)
        if progress:
            progress(1.0, f"LJSpeech is already in {corpus}")
        return corpus
    if corpus.exists():
        raise DownloadError(f"{corpus} exists but is incomplete (no {METADATA} or no {WAVS}/); "
                            "delete it and run again")
    root.mkdir(parents=True, exist_ok=True)
    archive = root / ARCHIVE
    part = root / (ARCHIVE + ".part")

    if archive.exists():
        if sha256 and sha256_of(archive, progress, 0.0, 0.8) != sha256:
            raise DownloadError(f"{archive} does not match the published SHA-256 {sha256}; it is damaged "
                                "or another file. Delete it and run again to download it afresh")
    else:
        try:
            _fetch(url, part, timeout, progress, share=0.75)
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as exc:
            kept = f" ({part.stat().st_size} bytes kept in {part} for resuming)" if part.exists() else ""
            raise DownloadError(f"cannot download {url}: {exc}{kept}. {_manual_hint(url, root)}") from exc
        if sha256:
            actual = sha256_of(part, progress, 0.75, 0.05)
            if actual != sha256:
                part.unlink()
                raise DownloadError(f"{url}: the downloaded file has SHA-256 {actual}, expected {sha256}; "
                                    f"it was removed, run again to download it afresh. {_manual_hint(url, root)}")
        part.replace(archive)

    corpus = extract_archive(archive, root, progress, start=0.8, share=0.2)
    read_metadata(corpus)
    if not keep_archive:
        archive.unlink()
    if progress:
        progress(1.0, f"LJSpeech is ready in {corpus}")
    return corpus
