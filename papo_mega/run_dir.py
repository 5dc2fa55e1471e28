"""The run directory must be writable before any process group starts.

A read-only or full run directory used to surface as a PermissionError traceback from rank 0's
first write (the resolved config), with the other ranks waiting in a collective until
parallel.timeout_s. Every rank checks first, so the job stops at once with one line.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from papo_mega.errors import PapoError


def os_error_fix(err: OSError) -> str:
    """What a user does about an OSError from writing a run's files."""
    if err.errno == errno.ENOSPC:
        return "no space left on device: free disk space, lower checkpoint.keep_last or use another run.run_dir"
    if err.errno == errno.EDQUOT:
        return "disk quota exceeded: free space in your quota or use another run.run_dir"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the directory writable or choose another one (run.run_dir=PATH)"
    return "check the path and the file system"


def describe_os_error(err: OSError) -> str:
    """One line: the failed path, the system's reason and the fix."""
    where = f" {err.filename}" if err.filename else ""
    reason = err.strerror or type(err).__name__
    return f"cannot write{where} ({reason}); {os_error_fix(err)}"


def check_writable(run_dir: str | Path) -> Path:
    """Create run_dir if needed and prove a file can be written in it (PapoError otherwise)."""
    path = Path(run_dir)
    probe = path / f".write_test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as handle:
            handle.write("ok")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise PapoError(f"run.run_dir={run_dir}: {describe_os_error(err)}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return path
