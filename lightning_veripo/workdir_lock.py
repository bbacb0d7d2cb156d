"""One run owns a work directory: `veripo iterate` holds a lock file there naming its holder (pid, host, start).

Two loops on one `work_dir` would interleave their checkpoints, spools, verifier files and metrics rows, and both
exit 0. The lock is a file `<work_dir>/.veripo.lock` the holder keeps open under an exclusive `flock`: the
kernel drops that lock when the holder dies, however it dies, so a SIGKILLed run's lock never blocks the same
command from resuming; the file's JSON (pid, host, start time, command) is what the error of a second run names.
A lock file whose holder is gone (no flock on it, and on this host no live process of that pid) is taken over
with a warning. A lock named by another host, or by a live process of this host that holds no flock (a pid
reused, or a run of a version before this lock), is refused: the message says how to remove it if it is stale.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_FILE = ".veripo.lock"


class WorkDirLockedError(RuntimeError):
    """Another run holds the work directory's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def _read_holder(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    if not raw.strip():
        return None
    try:
        holder = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"unreadable": raw[:200].decode("utf-8", "replace")}
    return holder if isinstance(holder, dict) else {"unreadable": str(holder)[:200]}


def describe(holder: dict[str, Any]) -> str:
    """`pid 123 on host h since 2026-12-02 18:30:00 UTC (veripo iterate --config ...)`."""
    if "unreadable" in holder:
        return f"an unreadable holder record ({holder['unreadable']!r})"
    since = holder.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, (int, float)) else "?"
    )
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {when}{command}"


def _open_locked(path: Path) -> tuple[int, dict[str, Any] | None]:
    """An fd of `path` under our flock, and the holder record it held; raises WorkDirLockedError if held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _read_holder(fd)
            os.close(fd)
            who = describe(holder) if holder else "another process (its record is not written yet)"
            raise WorkDirLockedError(
                f"{path.parent} is in use by another run: {who}. Two runs on one work_dir mix their "
                f"checkpoints and files; wait for it to end, stop it, or give this run another --work_dir."
            ) from None
        # The holder we raced may have released (unlinked) the file between our open and our flock: then we
        # hold a lock on a file nobody else can see; open the path again.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, _read_holder(fd)
        os.close(fd)


@contextlib.contextmanager
def hold_work_dir(work_dir: str | Path, command: str | None = None) -> Iterator[dict[str, Any]]:
    """Hold `work_dir`'s lock for the duration of the block (released, and the file removed, on any exit)."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / LOCK_FILE
    fd, previous = _open_locked(path)
    try:
        host = socket.gethostname()
        if previous:
            pid, same_host = previous.get("pid"), previous.get("host") == host
            if "unreadable" in previous or not same_host or (isinstance(pid, int) and _alive(pid)):
                where = "another host" if not same_host else "a live process"
                raise WorkDirLockedError(
                    f"{path} names {describe(previous)}, {where} this run cannot check is gone. If that run "
                    f"has ended, remove {path} and run the command again."
                )
            warnings.warn(
                f"{path}: taking over the lock of a run that is gone ({describe(previous)}; no process "
                f"{pid} on this host): resuming where it stopped.",
                stacklevel=3,
            )
        holder = {
            "pid": os.getpid(),
            "host": host,
            "started": time.time(),
            "command": command if command is not None else " ".join(["veripo", *sys.argv[1:]])[:500],
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)  # not ours: leave the file as it was
        raise
    try:
        yield holder
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before the flock goes, so nobody locks a file that is about to vanish
        os.close(fd)
