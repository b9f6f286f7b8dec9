"""Writing files so that a reader never sees half of one: write to a temporary name in
the same folder, then rename into place (atomic on one file system). One writer for the
core, the readers/writers in ``io.py`` and the command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: the same folder (so
    the rename is atomic) and the same suffix (writers choose the format by it)."""
    return path.with_name(f".partial-{os.getpid()}-{path.name}")


def write_atomic(path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temp_path)``, then rename the temp file onto ``path``: readers see
    the old file or the complete new one, never a truncated one. On any error (a full
    disk, an interrupt) the temp file is removed and the error propagates."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path, text: str) -> Path:
    """:func:`write_atomic` for a text file."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
