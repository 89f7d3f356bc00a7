"""Atomic directory writes: a destination is either left as it was or replaced by a complete one."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


def check_destination(dst, *, overwrite: bool = False) -> Path:
    """``dst`` as an absolute path, if it may be written: absent, empty, or ``overwrite``."""
    dst = Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"destination {dst} exists and is not empty; pass --overwrite to replace it")
    return dst


@contextlib.contextmanager
def atomic_dir(dst, overwrite: bool = False):
    """Yield a fresh temporary directory that becomes ``dst`` if the block succeeds.

    Refuses a ``dst`` that exists and is not empty unless ``overwrite``; on failure the
    temporary directory is removed and ``dst`` is left exactly as it was.
    """
    dst = check_destination(dst, overwrite=overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
    os.rename(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
