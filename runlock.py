"""One writer per directory: an exclusive advisory lock on DIR/.lock, held until the process ends.

`hold(directory, prog)` takes the lock before anything is written under `directory` (train.py's run
directory, ablate.py's and noise_study.py's --out) or stops with one line naming the holder's pid and
host. It is the operating system's lock, fcntl.flock on an open file: the kernel releases it when the
holding process ends, however it ends (exit, Ctrl-C, kill -9, a crash), so a lock file left by a dead
process is simply taken over; nothing is cleaned up by hand. The file holds "pid host" of the holder, for
the message only. Under torchrun only rank 0 calls `hold` (the other ranks write nothing of their own
outside rank 0's run directory). A second `hold` of the same directory in the same process is a no-op
(tests call train.main many times in one process); the lock is never released before the process ends.

Where this departs from, or fills a gap in, the paper:
1. The paper describes no run directory; this guard is ours. flock is advisory: it keeps out processes
   that also take it (train.py, ablate.py, noise_study.py), not an editor or `rm`. On network file
   systems it is as good as the file system's lock support (Linux NFS maps flock onto fcntl locks).
"""
import errno
import fcntl
import os
import pathlib
import socket
import time

LOCK_NAME = ".lock"
_held = {}  # real path of a locked directory -> the open lock file descriptor (kept until the process ends)


def _holder(fd) -> str:
    """'pid N on HOST' from the lock file (the holder writes it right after locking; wait a moment for it)."""
    for _ in range(20):
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        if len(text) >= 2 and text[0].isdigit():
            return f"pid {text[0]} on {text[1]}"
        time.sleep(0.05)
    return "another process (its pid is not recorded yet)"


def hold(directory, prog) -> pathlib.Path:
    """Lock `directory` (created if missing) for this process; SystemExit (one line) when another holds it."""
    directory = pathlib.Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"{prog}: cannot create {directory} ({e.strerror or e}); choose another directory") from None
    key = os.path.realpath(directory)
    if key in _held:
        return directory / LOCK_NAME
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        why = "it is a symbolic link" if e.errno == errno.ELOOP else (e.strerror or str(e))
        raise SystemExit(f"{prog}: cannot open the lock file {path} ({why}); choose another directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise SystemExit(f"{prog}: cannot lock {path} ({e.strerror or e})") from None
        holder = _holder(fd)
        os.close(fd)
        raise SystemExit(f"{prog}: {directory} is in use by {holder} (lock {path}); wait for it to finish, or "
                         f"use another directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _held[key] = fd
    return path
