"""SHA-256 checksums of every file a jaxlm directory holds, written beside them at save time.

Neither orbax nor safetensors checks the bytes of an array: orbax reads a checkpoint whose array
files had bytes flipped on copy and returns wrong numbers; safetensors checks its header and that
the tensors cover the file, not their contents. ``seal(directory)`` records the size and SHA-256 of
every file in ``directory/checksums.json``; ``verify(directory)`` names the first file that is
missing, has another size, or another hash. Files added later (not in the record) are ignored.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from pathlib import Path

NAME = "checksums.json"


class DamagedError(ValueError):
    """A file of a sealed directory is missing or differs from its checksum; ``file`` names it."""

    def __init__(self, directory: Path, file: str, reason: str):
        self.directory, self.file, self.reason = Path(directory), file, reason
        super().__init__(f"{Path(directory) / file} is damaged ({reason}): it does not match "
                         f"{Path(directory) / NAME}, written with it")


def _files(directory: Path, skip=()) -> list[str]:
    out = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for n in sorted(names):
            rel = os.path.relpath(os.path.join(root, n), directory)
            if rel != NAME and rel not in skip:
                out.append(rel)
    return out


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digests(directory: Path, names: list[str]) -> dict[str, str]:
    # hashlib releases the GIL on large buffers: files are hashed in parallel.
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda n: _digest(directory / n), names)))


def seal(directory, skip=()) -> None:
    """Write ``directory/checksums.json``: the size and SHA-256 of every other file in it but those
    in ``skip`` (paths relative to ``directory``, e.g. bookkeeping rewritten later), atomically."""
    directory = Path(directory)
    names = _files(directory, skip)
    digests = _digests(directory, names)
    record = {"algorithm": "sha256",
              "files": {n: {"size": (directory / n).stat().st_size, "sha256": digests[n]} for n in names}}
    tmp = directory / f".{NAME}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / NAME)


def is_sealed(directory) -> bool:
    return Path(directory, NAME).is_file()


def verify(directory) -> bool:
    """Raise ``DamagedError`` naming the first damaged file of a sealed directory; False if the
    directory has no checksums (written by an earlier jaxlm), True if every file matches."""
    directory = Path(directory)
    try:
        record = json.loads(Path(directory, NAME).read_text())
        files = record["files"]
    except FileNotFoundError:
        return False
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedError(directory, NAME, f"unreadable: {e}") from None
    for name, want in files.items():
        path = directory / name
        if not path.is_file():
            raise DamagedError(directory, name, "missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise DamagedError(directory, name, f"{size} bytes, {want['size']} when written")
    digests = _digests(directory, list(files))
    for name, want in files.items():
        if digests[name] != want["sha256"]:
            raise DamagedError(directory, name, "its SHA-256 differs")
    return True
