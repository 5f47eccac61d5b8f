"""One run per directory: an exclusive lock on ``DIR/.hpcnn.lock``, held for the whole run.

Two runs writing checkpoints into one directory lose data (one deletes the other's temporary
file, both name the same final file, a resumed run reads a file the other is replacing), so a
training run locks its checkpoint directory and a sweep its sweep directory before looking into
it. Rank 0 takes the lock; readers (``hpcnn.evaluate``, ``hpcnn.checkpoint``) take none.

The lock is ``fcntl.flock`` on the lock file, which holds the holder's host, PID and start time
(JSON) for the message that refuses a second run. The kernel drops a flock when its process ends
however it ends (``kill -9``, a crash), so a lock file that nobody holds is stale: the next run
takes it over and says so. A run that ends normally removes the file (after which a run that
opened the old file finds it gone and tries again, so two runs can never both hold "the" lock),
and the directories that taking the lock created, if they are still empty: a refused run leaves
nothing behind.

Where ``flock`` is not supported (some network file systems answer ``ENOLCK``/``EOPNOTSUPP``),
the lock is the file's existence alone (``O_EXCL`` creation): a file left by a dead process on
the same host is taken over; one from another host cannot be checked from here, and is refused
with the advice to delete it if that run is gone. (NFS mounted with ``nolock``, or Lustre with
``localflock``, accept ``flock`` but only between processes of one host: two runs started on
different hosts are not excluded there.)
"""

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from hpcnn.errors import UserError

NAME = ".hpcnn.lock"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # flock not available


class DirectoryLock:
    """A held lock on ``directory``; ``notes`` says what taking it found (a stale lock taken over)."""

    def __init__(self, path: Path, fd: int, notes: list[str]):
        self.path, self._fd, self.notes = path, fd, notes
        self.created: list[Path] = []  # directories made for the lock, deepest first

    @classmethod
    def acquire(cls, directory, what: str, advice: str) -> "DirectoryLock":
        """Lock ``directory`` (created if missing) or raise ``UserError``: naming the holder,
        ``f"{what} {directory} is in use by another run (...): {advice}"``, or saying that
        ``directory`` is not writable."""
        directory = Path(directory)
        created = []
        for d in (directory, *directory.parents):
            if d.exists():
                break
            created.append(d)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock = cls._acquire(directory / NAME, what, advice)
        except OSError as exc:
            _remove_empty(created)
            raise UserError(f"{what} {directory} is not writable: {exc}") from None
        except BaseException:
            _remove_empty(created)
            raise
        lock.created = created
        return lock

    @classmethod
    def _acquire(cls, path: Path, what: str, advice: str) -> "DirectoryLock":
        notes = []
        for _ in range(10):  # another run removing or replacing the file at the same moment: look again
            try:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(path, os.O_RDWR), False
                except FileNotFoundError:
                    continue
            try:
                lock = cls._take(path, fd, created, what, advice, notes)
            except BaseException:
                os.close(fd)
                raise
            if lock is not None:
                return lock
            os.close(fd)
        raise UserError(
            f"{what} {path.parent}: cannot take {path}: it keeps changing (another run starting?)"
        )

    @classmethod
    def _take(cls, path: Path, fd: int, created: bool, what: str, advice: str, notes: list):
        """The lock on the open lock file ``fd``, ``None`` to try again, or ``UserError``."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(_in_use(what, path, _holder(fd), advice)) from None
        except OSError as exc:
            if exc.errno not in UNSUPPORTED:
                raise UserError(f"{what} {path.parent}: cannot lock {path}: {exc}") from None
            return cls._take_without_flock(path, fd, created, what, advice, notes)
        if not _same_file(path, fd):  # removed or replaced since we opened it
            return None
        if not created and (previous := _read(fd)):
            notes.append(_stale(path, previous))
        _write(fd)
        return cls(path, fd, notes)

    @classmethod
    def _take_without_flock(cls, path: Path, fd: int, created: bool, what: str, advice: str, notes: list):
        if created:
            _write(fd)
            return cls(path, fd, notes)
        holder = _read(fd)
        here = holder.get("host") == socket.gethostname()
        if here and not _alive(holder.get("pid")):  # its process is gone: remove the file, create ours
            if _same_file(path, fd):  # (not a file another run has just put in its place)
                path.unlink(missing_ok=True)
                notes.append(_stale(path, holder))
            return None
        if holder and not here:
            holder_text = (
                f"{_describe(holder)}; file locks do not work on this file system and that host cannot be "
                f"checked from here: if that run has ended, delete {path}"
            )
        else:
            holder_text = _describe(holder)
        raise UserError(_in_use(what, path, holder_text, advice))

    def release(self) -> None:
        """Remove the lock file, then let go of it (a run that opens it in between finds it gone)."""
        if self._fd is None:
            return
        if _same_file(self.path, self._fd):  # (the directory may have been removed during the run)
            self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing releases the flock
        self._fd = None
        _remove_empty(self.created)


def _remove_empty(directories: list[Path]) -> None:
    for d in directories:  # deepest first
        try:
            d.rmdir()
        except OSError:  # not empty (checkpoints written: the usual case), or gone
            return


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        a, b = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _in_use(what: str, path: Path, holder: str, advice: str) -> str:
    return f"{what} {path.parent} is in use by another run ({holder}): {advice}"


def _stale(path: Path, holder: dict) -> str:
    return f"note: {path} was left by a run that ended without releasing it ({_describe(holder)}): taken over"


def _write(fd: int) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    data = json.dumps(holder).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data else {}
    except (OSError, ValueError):
        return {}


def _holder(fd: int) -> str:
    """Who holds the lock, read from the file (the holder writes it just after locking)."""
    for _ in range(20):
        holder = _read(fd)
        if holder:
            return _describe(holder)
        time.sleep(0.05)
    return _describe({})


def _describe(holder: dict) -> str:
    if not holder:
        return "its host and PID are not recorded yet"
    return f"PID {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
