"""Atomic directory writes: a destination is either left as it was or replaced by a complete one.

Everything is written to a hidden sibling (``.NAME.tmp-HOST-PID-XXXX``), flushed to disk (fsync of
every file and directory), optionally sealed with checksums, and only then renamed into place. A
process killed at any moment leaves DST as it was (or, killed between the two renames of an
overwrite, leaves the previous DST under ``.NAME.old-HOST-PID-XXXX``); the next write to the same
DST removes the dead process's temporary directory and puts such a previous DST back first.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from jaxlm.io import checksums

# A full disk, a file-size limit or a quota: the write failed for lack of room, not bad input.
NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_NO_ROOM_TEXT = ("no space left on device", "file too large", "disk quota exceeded")


def check_destination(dst, *, overwrite: bool = False) -> Path:
    """``dst`` as an absolute path, if it may be written: absent, empty, or ``overwrite``."""
    dst = Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"destination {dst} exists and is not empty; pass --overwrite to replace it")
    return dst


def no_room(e: BaseException) -> str | None:
    """The reason, if ``e`` (or an exception it was raised from) is a write that ran out of room:
    ENOSPC, EFBIG (a file-size limit) or EDQUOT, also as the text of a tensorstore error."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in NO_ROOM:
            return os.strerror(e.errno)
        text = str(e).lower()
        for t in _NO_ROOM_TEXT:
            if t in text:
                return t[0].upper() + t[1:]
        e = e.__cause__ or e.__context__
    return None


def _owner(name: str, kind: str, dst: Path):
    """(host, pid) of a ``.DST.kind-HOST-PID-XXXX`` sibling, or None if the name is not one."""
    prefix = f".{dst.name}.{kind}-"
    if not name.startswith(prefix):
        return None
    host, _, rest = name[len(prefix):].rpartition("-")  # rest: XXXX
    host, _, pid = host.rpartition("-")
    return (host, int(pid)) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(dst, log=None) -> None:
    """Clean up after a writer of ``dst`` on this host that was killed: remove its temporary
    directory; if it died between the two renames of an overwrite, put the previous ``dst`` back."""
    dst = Path(dst).absolute()
    if not dst.parent.is_dir():
        return
    here = socket.gethostname()
    for p in sorted(dst.parent.iterdir()):
        for kind in ("tmp", "old"):
            owner = _owner(p.name, kind, dst)
            if owner is None or owner[0] != here or _alive(owner[1]):
                continue
            if kind == "old" and not dst.exists():
                os.rename(p, dst)
                if log is not None:
                    log(f"restored {dst} from {p.name}, left by a write that was killed (pid {owner[1]})")
            else:
                shutil.rmtree(p, ignore_errors=True)


def fsync_tree(directory: Path) -> None:
    """Flush every file and directory under ``directory`` to disk."""
    for root, _, names in os.walk(directory):
        for n in names:
            fd = os.open(os.path.join(root, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(tmp: Path) -> None:
    """Remove a failed write's temporary directory. A writer's threads (tensorstore's, under orbax)
    may still create directories for writes already failing: remove until it stays gone (about
    0.2 s), and once more at exit."""
    quiet = 0
    for _ in range(50):
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            quiet = 0
        else:
            quiet += 1
            if quiet == 4:
                break
        time.sleep(0.05)
    atexit.register(shutil.rmtree, tmp, True)


@contextlib.contextmanager
def atomic_dir(dst, overwrite: bool = False, *, seal: bool = False):
    """Yield a fresh temporary directory that becomes ``dst`` if the block succeeds.

    Refuses a ``dst`` that exists and is not empty unless ``overwrite``; on failure the
    temporary directory is removed and ``dst`` is left exactly as it was. ``seal``: record the
    checksums of every file (``checksums.seal``) before the rename. A write that runs out of room
    (full disk, file-size limit, quota) is one ``OSError`` line naming ``dst``.
    """
    dst = Path(dst).absolute()
    recover(dst)
    dst = check_destination(dst, overwrite=overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dst.parent / f".{dst.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if seal:
            checksums.seal(tmp)
        fsync_tree(tmp)
    except BaseException as e:
        _remove(tmp)
        reason = no_room(e)
        if reason is not None:
            err = OSError(f"could not write {dst}: {reason}; nothing was written ({dst} is as it was)")
            err.errno = e.errno if isinstance(e, OSError) and e.errno in NO_ROOM else errno.ENOSPC
            raise err from None
        raise
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{tag}"
        os.rename(dst, old)
    os.rename(tmp, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
