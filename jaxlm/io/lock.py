"""One writer per training workdir.

``WorkdirLock`` holds an exclusive ``flock`` on ``WORKDIR/.lock`` while a run lives and writes the
holder (host, pid) into it. A second ``jaxlm train`` on the same workdir is refused with one line
naming the holder. The kernel drops the lock when its process ends, however it ends (SIGKILL and
the OOM killer included), so a lock left by a dead process is free: the next run takes it over and
says whose it was. Only process 0 of a multi-host run takes it; the other processes of that run
write nothing the lock protects. (``flock`` across hosts needs a file system that supports it, as
local disks and NFSv4 do.)
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir."""


class WorkdirLock:
    def __init__(self, workdir):
        self.path = Path(workdir) / ".lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        self._file.seek(0)
        previous = self._file.read().strip()
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._file.close()
            if not isinstance(e, BlockingIOError):
                raise
            raise WorkdirBusy(f"{workdir} is in use by a running jaxlm train ({previous or 'holder unknown'}); "
                              "wait for it to finish, stop it, or use another train.workdir") from None
        # Ours now: whatever the file says is a holder that ended without releasing it.
        self.taken_over = previous or None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if self._file.closed:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.flush()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
