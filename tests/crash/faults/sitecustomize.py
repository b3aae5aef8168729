"""Faults for the jsonl store of a daemon under test, as a full or a dying disk.

Python imports this at start-up when its directory is on PYTHONPATH. While the
file named by $CHINWAG_TEST_FAULTS exists, the jsonl backend's writes fail
(the file says ``write``: ENOSPC, nothing written) or its fsyncs do (``sync``:
EIO, after the write went through), through the same seams the conformance
suite replaces in-process.
"""

from __future__ import annotations

import errno
import os

_flag = os.environ.get("CHINWAG_TEST_FAULTS")
if _flag:
    from chinwag.storage import _jsonl

    def _fault() -> str:
        try:
            with open(_flag) as f:
                return f.read().strip()
        except FileNotFoundError:
            return ""

    _real_write, _real_sync = _jsonl._write_all, _jsonl._sync

    def _write_all(fd: int, data: bytes) -> None:
        if _fault() == "write":
            raise OSError(errno.ENOSPC, "injected failure")
        _real_write(fd, data)

    def _sync(fd: int) -> None:
        if _fault() == "sync":
            raise OSError(errno.EIO, "injected failure")
        _real_sync(fd)

    _jsonl._write_all, _jsonl._sync = _write_all, _sync
