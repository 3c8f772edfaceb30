"""One writer per directory: an exclusive advisory lock on DIR/.lock, held until the process ends.

`hold(directory, prog)` takes the lock before anything is written under `directory` (train.py's run
directory, ablate.py's and noise_study.py's --out) or raises errors.Refusal, one line naming the holder's
pid, host and command, which the refused command prints after its own name. It is the operating system's
lock, fcntl.flock on an open file: the kernel releases it when the holding process ends, however it ends
(exit, Ctrl-C, kill -9, a crash), so a lock file left by a dead process is simply taken over; nothing is
cleaned up by hand. The file holds "pid host prog" of the holder, for the message only. Under torchrun
only rank 0 calls `hold` (the other ranks write nothing of their own outside rank 0's run directory). A
second `hold` of the same directory in the same process is a no-op (tests call train.main many times in one
process); the lock is never released before the process ends.

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

import errors

LOCK_NAME = ".lock"
_held = {}  # real path of a locked directory -> the open lock file descriptor (kept until the process ends)


def _holder(fd) -> str:
    """'pid N on HOST running PROG' from the lock file (the holder writes it right after locking; wait a moment
    for it). A file of an older version holds no PROG: 'pid N on HOST'."""
    for _ in range(20):
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        if len(text) >= 2 and text[0].isdigit():
            return f"pid {text[0]} on {text[1]}" + (f" running {' '.join(text[2:])}" if text[2:] else "")
        time.sleep(0.05)
    return "another process (its pid is not recorded yet)"


def hold(directory, prog) -> pathlib.Path:
    """Lock `directory` (created if missing) for this process; `prog` (the command) is recorded beside its pid
    for the message another process gets. errors.Refusal (one line; the refused command prefixes its own name)
    when the directory cannot be created or locked, or another process holds it."""
    directory = pathlib.Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise errors.Refusal(f"cannot create {directory} ({e.strerror or e}); choose another directory") from None
    key = os.path.realpath(directory)
    if key in _held:
        return directory / LOCK_NAME
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        why = "it is a symbolic link" if e.errno == errno.ELOOP else (e.strerror or str(e))
        raise errors.Refusal(f"cannot open the lock file {path} ({why}); choose another directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise errors.Refusal(f"cannot lock {path} ({e.strerror or e})") from None
        holder = _holder(fd)
        os.close(fd)
        raise errors.Refusal(f"{directory} is in use by {holder} (lock {path}); wait for it to finish, or "
                             f"use another directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {' '.join(str(prog).split())}\n".encode(), 0)
    _held[key] = fd
    return path
