"""Writing files so that nothing is lost: whole or absent, never half-written.

Every file attnlm writes goes to a temporary file beside its destination, named
`.NAME.tmp-PID@HOST`, is flushed to disk, then renamed over the destination. A crash at any moment
leaves the old file or the new one, whole; a failure removes the temporary file. A process
killed outright (kill -9, power loss) cannot remove its own, so `remove_stale_temps` lets the
next run clear what a dead writer left: a process of this machine that no longer runs (a folder
other machines share, a token cache on a network file system, keeps their writers' files).
"""

import contextlib
import errno
import os
import re
import socket
from pathlib import Path

from attnlm.errors import AttnlmError

TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)@(?P<host>.*)$")
HOST = socket.gethostname()


def temp_path(path):
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}@{HOST}")


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems cannot open a folder; the rename still happened
        return
    try:
        os.fsync(fd)  # make the rename itself durable
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path, mode="wb", encoding=None):
    """A file object whose contents replace `path` only if the block finishes without error."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def write_errors(what, advice=""):
    """An OSError while writing `what` as one line (exit 1) rather than a traceback: the disk
    full, the folder gone or read-only; `advice` (from "; ") says what to do."""
    try:
        yield
    except OSError as err:
        reason = ("no space left on the device" if err.errno == errno.ENOSPC
                  else err.strerror or str(err))
        raise AttnlmError(f"cannot write {what}: {reason}{advice}") from None


def atomic_write(path, data):
    """Replace `path` with `data` (str as UTF-8, or bytes), whole or not at all."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_open(path, "wb") as f:
        f.write(data)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temps(directory, every=False):
    """Remove the temporary files that writers killed outright left in `directory`: those of
    this machine's processes that no longer run, or all of them with `every` (for a folder only
    this process writes, such as a locked run directory). Returns the paths removed."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = TEMP.match(entry.name)
        if not match or not entry.is_file():
            continue
        pid, host = int(match["pid"]), match["host"]
        if host == HOST and pid == os.getpid():
            continue
        if not every and (host != HOST or _alive(pid)):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed.append(entry)
    return removed
