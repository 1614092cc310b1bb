"""Download VQA v2 and its COCO images by their official names, resumably, verified, unpacked in place.

    fetch("data", ["train", "val"])                        # what training/download_vqa_v2.py runs
    fetch("data", ["val"], mirror="http://mirror:8000")    # same paths, another host

Each archive goes through four steps, and a step already done is skipped on the next run:
1. download: the bytes arrive in ROOT/.partial/NAME.part; after any interruption (Ctrl-C, a
   dropped connection, kill -9) the next request asks for `Range: bytes=N-` and appends on 206
   (a server that ignores Range answers 200: the file starts again). Complete, it becomes ROOT/NAME.
2. verify: its size against Content-Length / Content-Range, every member's CRC (zipfile.testzip),
   then its sha256 is recorded in ROOT/MANIFEST.json; later runs check that sha256. A failed check
   deletes the archive and downloads it once more; a second failure is an error naming the file.
3. unpack: into a hidden sibling folder, then renamed into place: ROOT/*.json, ROOT/train2014/, ...
   (the question zips hold their JSON at the top level, the COCO zips a train2014/ ... folder).
4. record: MANIFEST.json says the archive is unpacked; the archives themselves are kept.

Only the standard library (urllib) and tqdm: nothing to install beyond the project.
"""

import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .errors import DataError, VQAError
from .files import atomic_write_text, temporary_name

_VQA = "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/"
_COCO = "http://images.cocodataset.org/zips/"
MANIFEST = "MANIFEST.json"
PARTIAL = ".partial"
CHUNK = 1 << 20
TIMEOUT_S = 60
# Waits before each new try after a dropped connection; each try resumes where the last one stopped.
RETRY_WAITS_S = (0.5, 5.0, 30.0)
USER_AGENT = "vqa-demo-download/1 (+urllib)"


class DownloadError(VQAError):
    """An archive could not be fetched, verified or unpacked; the message names the URL, file or folder."""


class DownloadInterrupted(KeyboardInterrupt):
    """Ctrl-C during a download: the message says where the partial file is kept."""


@dataclass(frozen=True)
class Archive:
    url: str  # the official URL
    outputs: tuple[str, ...]  # what unpacking puts in ROOT: JSON files, or one image folder ("val2014/")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


QUESTIONS_TRAIN = Archive(_VQA + "v2_Questions_Train_mscoco.zip", ("v2_OpenEnded_mscoco_train2014_questions.json",))
QUESTIONS_VAL = Archive(_VQA + "v2_Questions_Val_mscoco.zip", ("v2_OpenEnded_mscoco_val2014_questions.json",))
QUESTIONS_TEST = Archive(_VQA + "v2_Questions_Test_mscoco.zip", ("v2_OpenEnded_mscoco_test2015_questions.json",
                                                                  "v2_OpenEnded_mscoco_test-dev2015_questions.json"))
ANNOTATIONS_TRAIN = Archive(_VQA + "v2_Annotations_Train_mscoco.zip", ("v2_mscoco_train2014_annotations.json",))
ANNOTATIONS_VAL = Archive(_VQA + "v2_Annotations_Val_mscoco.zip", ("v2_mscoco_val2014_annotations.json",))
IMAGES_TRAIN = Archive(_COCO + "train2014.zip", ("train2014/",))
IMAGES_VAL = Archive(_COCO + "val2014.zip", ("val2014/",))
IMAGES_TEST = Archive(_COCO + "test2015.zip", ("test2015/",))

# docs/vqa-v2.md, section 1: test-dev's questions are in the test zip, its images are test2015's.
SPLITS: dict[str, tuple[Archive, ...]] = {
    "train": (QUESTIONS_TRAIN, ANNOTATIONS_TRAIN, IMAGES_TRAIN),
    "val": (QUESTIONS_VAL, ANNOTATIONS_VAL, IMAGES_VAL),
    "test-dev": (QUESTIONS_TEST, IMAGES_TEST),
}


def archives_for(splits) -> list[Archive]:
    """The archives the splits need, each once, in the order of SPLITS' table."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DataError(f"unknown split {unknown[0]!r}: choose from {', '.join(SPLITS)}")
    return list(dict.fromkeys(a for s in splits for a in SPLITS[s]))


def mirror_url(url: str, mirror: str | None) -> str:
    """`url` with its scheme and host replaced by the mirror's (a path prefix of the mirror is kept too)."""
    if not mirror:
        return url
    base = urllib.parse.urlsplit(mirror)
    if not base.scheme or not base.netloc:
        raise DataError(f"--mirror {mirror!r} is not a URL like http://host:port")
    path = urllib.parse.urlsplit(url).path
    return urllib.parse.urlunsplit((base.scheme, base.netloc, base.path.rstrip("/") + path, "", ""))


# ---------------------------------------------------------------- HTTP

def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def _open(url: str, method: str = "GET", start: int = 0):
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError:
        raise
    except urllib.error.URLError as error:
        raise DownloadError(f"cannot reach {_host(url)}: {_reason(error.reason)} "
                            "(no network? --mirror URL names another host)") from error
    except (OSError, http.client.HTTPException) as error:
        raise DownloadError(f"cannot reach {_host(url)}: {_reason(error)}") from error


def _reason(error) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error) or type(error).__name__


def _http_error(error: urllib.error.HTTPError, url: str) -> DownloadError:
    if error.code == 404:
        return DownloadError(f"not found (HTTP 404): {url}")
    return DownloadError(f"HTTP {error.code} {error.reason} from {url}")


def remote_size(url: str) -> int | None:
    """The archive's size from a HEAD request, or None when the server does not say."""
    try:
        with _open(url, "HEAD") as response:
            length = response.headers.get("Content-Length")
    except urllib.error.HTTPError as error:
        if error.code in (405, 501):  # HEAD not supported: the size stays unknown
            return None
        raise _http_error(error, url) from error
    return int(length) if length and length.isdigit() else None


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def download_file(url: str, dest: str | Path, partial_dir: str | Path | None = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> Path:
    """Download `url` to `dest`, resuming from `partial_dir/NAME.part` (default: DEST_FOLDER/.partial).

    The size is checked against Content-Length (200) or Content-Range's total (206). A dropped
    connection is retried (RETRY_WAITS_S), each try resuming where the last stopped.
    """
    dest = Path(dest)
    partial_dir = Path(partial_dir) if partial_dir is not None else dest.parent / PARTIAL
    partial_dir.mkdir(parents=True, exist_ok=True)
    part = partial_dir / f"{dest.name}.part"
    for attempt in range(len(RETRY_WAITS_S) + 1):
        try:
            if _download_once(url, part, progress, log):
                os.replace(part, dest)
                return dest
        except (ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException) as error:
            log(f"{dest.name}: the connection to {_host(url)} dropped ({_reason(error)})")
        except KeyboardInterrupt:
            have = part.stat().st_size if part.exists() else 0
            raise DownloadInterrupted(f"interrupted: the partial download of {dest.name} ({have:,} bytes) is kept "
                                      f"in {part}; run the same command again to resume it") from None
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise DownloadError(f"disk full while downloading {dest.name} into {partial_dir} "
                                    f"(the partial file is kept: free some space and run again)") from error
            raise
        if attempt < len(RETRY_WAITS_S):
            time.sleep(RETRY_WAITS_S[attempt])
    have = part.stat().st_size if part.exists() else 0
    raise DownloadError(f"the connection to {_host(url)} dropped {len(RETRY_WAITS_S) + 1} times while downloading "
                        f"{url}; {have:,} bytes are kept in {part}: run again to resume")


def _download_once(url: str, part: Path, progress: bool, log) -> bool:
    """One request: True when `part` is complete, False when the connection stopped short."""
    have = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, start=have)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # asked for bytes past the end: complete if the total agrees
            match = re.fullmatch(r"bytes \*/(\d+)", error.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == have:
                return True
            log(f"{part.name}: the server refused to resume it; starting again")
            part.unlink()
            return False
        raise _http_error(error, url) from error
    with response:
        length = response.headers.get("Content-Length")
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                log(f"{part.name}: the server sent another range than asked; starting again")
                part.unlink()
                return False
            total = int(match.group(3)) if match.group(3) != "*" else None
            mode = "ab"
        else:  # 200: the whole file, also when a Range was asked for and ignored
            if have:
                log(f"{part.name}: the server does not resume downloads; starting again")
            have, mode = 0, "wb"
            total = int(length) if length and length.isdigit() else None
        # Unbuffered: every byte read is in the file before the next read, so even kill -9 keeps them.
        with part.open(mode, buffering=0) as out, tqdm(total=total, initial=have, desc=part.name[:-5], unit="B",
                                                      unit_scale=True, unit_divisor=1024, disable=not progress,
                                                      leave=False) as bar:
            while True:
                chunk = response.read1(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                have += len(chunk)
                bar.update(len(chunk))
    if total is None:
        return True
    if have > total:
        log(f"{part.name}: {have:,} bytes, more than the {total:,} announced; starting again")
        part.unlink()
        return False
    if have < total:
        log(f"{part.name}: {have:,} of {total:,} bytes arrived before the connection dropped")
    return have == total


# ---------------------------------------------------------------- verification

def sha256_of(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f, tqdm(total=path.stat().st_size, desc=f"sha256 {path.name}", unit="B",
                                    unit_scale=True, unit_divisor=1024, disable=not progress, leave=False) as bar:
        while block := f.read(CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def zip_problem(path: Path) -> str | None:
    """What is wrong with the zip's structure or its members' CRCs, or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as error:
        return f"not a valid zip archive ({error})"
    except (EOFError, zlib.error, OSError) as error:
        return f"unreadable zip archive ({error})"
    return f"member {bad} fails its CRC check" if bad else None


def _load_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        return {"archives": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DownloadError(f"{path} is not valid JSON ({error}): delete it to verify the archives afresh") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("archives"), dict):
        raise DownloadError(f"{path} has no 'archives' object: delete it to verify the archives afresh")
    return manifest


def _save_manifest(root: Path, manifest: dict) -> None:
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- unpacking

def outputs_present(root: Path, archive: Archive) -> bool:
    return all((root / out).is_dir() if out.endswith("/") else (root / out).is_file() for out in archive.outputs)


def unpack(path: Path, archive: Archive, root: Path, progress: bool = True) -> None:
    """Extract into a hidden sibling folder of ROOT's outputs, then rename each output into place."""
    staging = temporary_name(root / f"unpack-{archive.name}")
    _remove_stale(root, f".unpack-{archive.name}.tmp-")
    try:
        staging.mkdir()
        with zipfile.ZipFile(path) as zipped:
            members = zipped.infolist()
            with tqdm(total=sum(m.file_size for m in members), desc=f"unpacking {archive.name}", unit="B",
                      unit_scale=True, unit_divisor=1024, disable=not progress, leave=False) as bar:
                for member in members:
                    zipped.extract(member, staging)  # extract() drops absolute and ".." parts of names
                    bar.update(member.file_size)
        missing = [out for out in archive.outputs if not outputs_present(staging, Archive(archive.url, (out,)))]
        if missing:
            raise DownloadError(f"archive {path} does not contain {missing[0]} (its top level holds: "
                                f"{', '.join(sorted(p.name for p in staging.iterdir())) or 'nothing'})")
        for out in archive.outputs:
            target = root / out.rstrip("/")
            if target.is_dir():
                old = temporary_name(root / f"old-{target.name}")
                os.replace(target, old)
                shutil.rmtree(old)
            os.replace(staging / out.rstrip("/"), target)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise DownloadError(f"disk full while unpacking {path.name} into {root}") from error
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale(folder: Path, prefix: str) -> None:
    """Delete `prefix + PID` leftovers of processes that no longer run (a killed unpack leaves gigabytes)."""
    for path in folder.glob(f"{prefix}*"):
        pid = path.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- the whole job

def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB ({n:,} bytes)"


def check_disk_space(root: Path, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if needed > free:
        raise DownloadError(f"not enough free disk space in {root}: the archives and their unpacked files need "
                            f"{_gb(needed)}, {_gb(free)} are free")


def unpacked(root: str | Path, splits=SPLITS) -> bool:
    """Whether MANIFEST.json says every archive of `splits` is unpacked and what it unpacked is
    there (without hashing the kept archives again: 31 GB, minutes)."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        return False
    entries = _load_manifest(root)["archives"]
    return all(entries.get(a.name, {}).get("unpacked") and outputs_present(root, a) for a in archives_for(splits))


def fetch(root: str | Path, splits=("train", "val", "test-dev"), mirror: str | None = None, progress: bool = True,
          log: Callable[[str], None] = print) -> dict[str, Path]:
    """Download, verify and unpack the archives of `splits` into `root`; returns {archive name: path}.

    Disk space is checked first: the archives still to download (HEAD sizes, less what .partial
    already holds) plus their unpacked size, taken as the archive's size again: right for the JPEG
    zips, low for the JSON ones (v2_mscoco_train2014_annotations.json alone is 356 MB unpacked),
    which are small beside COCO's 13 + 6 + 12 GB of images.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archives = archives_for(splits)
    manifest = _load_manifest(root)
    entries = manifest["archives"]
    refetch = set()  # archives whose kept copy failed its sha256: they get no other retry

    # Archives kept from an earlier run: the sha256 recorded then must still match.
    for archive in archives:
        path, entry = root / archive.name, entries.get(archive.name, {})
        if path.is_file() and entry.get("sha256"):
            log(f"{archive.name}: checking its sha256")
            if sha256_of(path, progress) != entry["sha256"]:
                log(f"{archive.name}: its sha256 differs from the one {MANIFEST} recorded; downloading it again")
                path.unlink()
                refetch.add(archive.name)

    def unpacked(a: Archive) -> bool:
        return bool(entries.get(a.name, {}).get("unpacked")) and outputs_present(root, a)

    def wanted(a: Archive) -> bool:  # unpacked earlier and its archive deleted since: nothing to do
        return (root / a.name).is_file() or a.name in refetch or not unpacked(a)

    needed = 0
    for archive in archives:
        path = root / archive.name
        if path.is_file():
            needed += 0 if unpacked(archive) else path.stat().st_size
        elif wanted(archive):
            size = remote_size(mirror_url(archive.url, mirror))
            if size is None:
                log(f"{archive.name}: the server does not give its size; the disk space check leaves it out")
                continue
            part = root / PARTIAL / f"{archive.name}.part"
            needed += size - (part.stat().st_size if part.is_file() else 0) + (0 if unpacked(archive) else size)
    check_disk_space(root, needed)

    for archive in [a for a in archives if wanted(a)]:
        path = _verified_archive(root, archive, mirror, entries, 0 if archive.name in refetch else 1, progress, log)
        _save_manifest(root, manifest)
        if not unpacked(archive):
            log(f"{archive.name}: unpacking")
            unpack(path, archive, root, progress)
            entries[archive.name]["unpacked"] = True
            _save_manifest(root, manifest)
    if (root / PARTIAL).is_dir() and not any((root / PARTIAL).iterdir()):
        (root / PARTIAL).rmdir()
    return {a.name: root / a.name for a in archives}


def _verified_archive(root: Path, archive: Archive, mirror, entries: dict, retries: int, progress, log) -> Path:
    """ROOT/NAME present and verified (downloaded when missing); its entry in `entries` up to date."""
    path = root / archive.name
    url = mirror_url(archive.url, mirror)
    entry = entries.get(archive.name, {})
    if path.is_file() and entry.get("sha256"):
        return path  # checked against the manifest above
    while True:
        if not path.is_file():
            log(f"{archive.name}: downloading {url}")
            download_file(url, path, root / PARTIAL, progress, log)
        problem = zip_problem(path)
        digest = sha256_of(path, progress) if problem is None else None
        if problem is None and entry.get("sha256") and digest != entry["sha256"]:
            problem = f"its sha256 {digest} differs from {entry['sha256']}, the one {MANIFEST} recorded"
        if problem is None:
            entries[archive.name] = {"url": archive.url, "size": path.stat().st_size, "sha256": digest,
                                     "unpacked": bool(entry.get("unpacked"))}
            return path
        path.unlink()
        if retries <= 0:
            raise DownloadError(f"archive {path} is corrupt: {problem}, again after downloading it a second time "
                                f"from {url}")
        retries -= 1
        log(f"{archive.name}: {problem}; downloading it again")

