"""The files and folders a command writes (``--out``), checked before any work starts: a command
that trains, evaluates or exports for minutes must not fail at the end on where it writes.

One rule for every command: an existing file is not replaced without ``--overwrite``, a folder
is not where a file goes (nor a file where a folder goes), and a folder that does not exist is
made only inside a folder that exists and is writable. A folder of figures that already holds
files (an earlier report's) is written into only with ``--overwrite``.
"""
from __future__ import annotations

import os
from pathlib import Path

from cohort.config.errors import CohortError

OVERWRITE_HELP = "replace what --out names if it exists (default: refuse, before any work)"


def check_output_file(path: str | Path, where: str, overwrite: bool, make_folders: bool = False) -> Path:
    """``path`` (absolute) when a file may be written there; else one line naming ``where``.
    ``make_folders``: missing folders above it are made (inside one that exists and is writable)."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise CohortError(f"{shown(path)} is a folder, not a file", where)
    if path.exists() and not overwrite:
        raise CohortError(f"{shown(path)} exists: give --overwrite to replace it, or another --out", where)
    if path.exists() and not os.access(path, os.W_OK):
        raise CohortError(f"{shown(path)} is not writable", where)
    check_creatable(path.parent, where, make_folders)
    return path


def check_output_folder(path: str | Path, where: str, overwrite: bool) -> Path:
    """``path`` (absolute) when figures may be written into it: a folder that does not exist yet
    (made inside a writable one), an empty one, or, with ``overwrite``, one that holds files."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        if any(path.iterdir()) and not overwrite:
            raise CohortError(f"folder {shown(path)} is not empty: give --overwrite to write over its files, or "
                              "another --out", where)
        check_creatable(path, where, False)
    elif path.exists():
        raise CohortError(f"{shown(path)} is a file, not a folder", where)
    else:
        check_creatable(path, where, True)
    return path


def check_creatable(folder: Path, where: str, make_folders: bool) -> None:
    """``folder`` is a writable folder, or (``make_folders``) can be made in one."""
    existing = folder
    while make_folders and not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.exists():
        raise CohortError(f"folder {shown(existing)} does not exist", where)
    if not existing.is_dir():
        raise CohortError(f"{shown(existing)} is a file, not a folder", where)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CohortError(f"folder {shown(existing)} is not writable", where)


def shown(path: Path) -> str:
    """A path as an error quotes it: repr, so control characters show as escapes on one line."""
    return repr(str(path))
