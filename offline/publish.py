"""Putting a finished artifact directory in place: usual file modes, atomic rename."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from recfleet.shared.artifacts import MANIFEST


def set_usual_modes(path: Path) -> None:
    """Give the directory and its files the modes the umask gives new ones.

    ``mkdtemp`` makes the directory 0700 and safetensors writes 0600, which would keep
    workers running as another user (containers) from reading the artifacts.
    """
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for file in path.iterdir():
        file.chmod(0o666 & ~umask)


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, replacing an earlier artifact directory there.

    Raises FileExistsError if ``out`` exists and is not an (empty or) artifact directory.
    """
    if not out.exists():
        tmp.rename(out)
        return
    if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
        raise FileExistsError(f"{out} exists and is not an artifact directory; not replacing it")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
