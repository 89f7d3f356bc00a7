"""orbax's noise after a failed write, silenced: the error itself reaches the caller (and the
``jaxlm`` command reports it in one line)."""

from __future__ import annotations

import functools
import logging
import os
import sys


class _OrbaxErrors(logging.Filter):
    """Drop orbax's own ERROR logs (tracebacks from its save threads): the same error is raised
    to the caller (``TrainCheckpoints.save`` / ``wait``, ``atomic_dir``), which reports it."""

    def filter(self, record):
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _orbax_aftermath(unraisable) -> bool:
    """After a failed write, tensorstore's write callbacks find orbax's event loop closed and its
    abandoned write coroutines are collected at exit: nothing more to learn from either."""
    code = getattr(unraisable.object, "cr_code", None)
    return ((unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed")
            or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename))


@functools.cache
def quiet_orbax_errors() -> None:
    """Install the log filter and the unraisable-exception filter (once)."""
    logging.getLogger("absl").addFilter(_OrbaxErrors())
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _orbax_aftermath(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
