"""Atomic file writes: the one temporary-name-then-rename rule every writer of vqa/ uses.

    with atomic_path(folder / "ood.safetensors") as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(folder / "index.json", text)

A reader sees the old file or the new one, never half of one. The temporary name holds the
process id: torchrun's ranks once wrote one detector through a shared `ood.safetensors.tmp`,
and one rank renamed the other's half-written file into place (or found it gone).
"""

import os
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
