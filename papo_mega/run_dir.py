"""The run directory must be writable before any process group starts.

A read-only or full run directory used to surface as a PermissionError traceback from rank 0's
first write (the resolved config), with the other ranks waiting in a collective until
parallel.timeout_s. Every rank checks first, so the job stops at once with one line.

`write_atomic` is the one way a run's small files (checkpoint markers, the `latest` pointer, the
demo summary) are replaced: readers see the old or the new text, never half.
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


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: some file systems refuse a directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write text to path via a temporary file and os.replace (readers see old or new, never half)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
