"""Atomic writes of files and folders, the one temporary-name-then-rename rule every writer of
vqa/ uses, and the project's cache folder.

    with atomic_path(folder / "ood.safetensors") as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(folder / "index.json", text)

A reader sees the old file or the new one, never half of one. The temporary name holds the
process id: torchrun's ranks once wrote one detector through a shared `ood.safetensors.tmp`,
and one rank renamed the other's half-written file into place (or found it gone).
"""

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_name(path: str | Path) -> Path:
    """This process's hidden sibling of `path`: `.NAME.tmp-PID`."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name to write to, renamed over `path` when the block ends; deleted when it raises."""
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def _remove_leftovers(folder: Path) -> None:
    """Delete the temporary siblings (.NAME.XXXXXXXX, .NAME.old) of saves that were killed.

    Killed between its two renames, a save leaves the old checkpoint only in .NAME.old:
    that one is put back first. (Saving one checkpoint from two processes at once is not supported.)
    """
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and old.is_dir():
        os.replace(old, folder)
    leftover = re.compile(rf"\.{re.escape(folder.name)}\.([a-z0-9_]{{8}}|old)")  # mkdtemp adds 8 of [a-z0-9_]
    for path in folder.parent.iterdir():
        if leftover.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_folder(folder: str | Path):
    """Yield a temporary sibling folder to fill; on success it replaces `folder` by rename, so
    a crash at any point leaves the previous folder (or nothing) in place, never half of one.
    Checkpoints, the stage-1 encoder and converted parquet splits are written this way."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        # mkdtemp makes a private folder; give the result the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for path in tmp.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_home() -> Path:
    """The project's cache folder: $VQA_CACHE_DIR, else ~/.cache/vqa-demo (generated and converted data)."""
    return Path(os.environ.get("VQA_CACHE_DIR", "~/.cache/vqa-demo")).expanduser()
