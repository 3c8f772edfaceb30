"""A full disk as one line naming the file and the bytes it needs, not a library's traceback.

`need(path, nbytes, why)` refuses a write before it starts when the file system holding `path` has less
than `nbytes` free (shutil.disk_usage); `translate(path, nbytes)` is a context manager around a write that
turns the ways a full disk surfaces (OSError ENOSPC / EDQUOT / EFBIG, torch.save's "enforce fail at
inline_container", safetensors' "os error 28", anywhere in the exception chain, or any failed write while
the disk has less than `nbytes` left) into `DiskFull`. DiskFull is an OSError whose text is the one line,
so every CLI's `except OSError` prints it as it is.

Where this departs from, or fills a gap in, the paper:
1. Not part of the method: run-directory plumbing. Sizes are estimates (tensor bytes plus a small
   margin for the container format), enough to say how much room to make.
"""
import contextlib
import errno
import os
import shutil

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
FULL_TEXTS = ("no space left", "os error 28", "code: 28", "storagefull", "disk quota", "file too large")


class DiskFull(OSError):
    """No room for a write: the message names the file and the bytes it needs."""

    def __init__(self, message):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self):
        return self.message


def size_text(n) -> str:
    """Bytes as a short human number: 1536 -> "1.5 KiB", a whole number of units without decimals (1048576 ->
    "1 MiB", 65536 -> "64 KiB", 1000 -> "1000 bytes")."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024


def free_bytes(path) -> int:
    """Free bytes on the file system holding path (its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def need(path, nbytes, why="") -> None:
    """DiskFull before writing `path` when its file system has less than nbytes free."""
    free = free_bytes(path)
    if free < nbytes:
        raise DiskFull(f"{path}: not enough disk space: writing it needs {size_text(nbytes)}{why}, "
                       f"{size_text(free)} free; free some space or use another directory")


def is_full(exc) -> bool:
    """Whether an exception (or one it was raised from or during) says the disk or a quota is full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        if any(t in str(exc).lower() for t in FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def translate(path, nbytes=0, why=""):
    """Run a write of `path`; a full disk during it becomes DiskFull (one line: the file, the bytes needed)."""
    try:
        yield
    except Exception as e:
        if isinstance(e, DiskFull) and not nbytes:  # an inner write already said it
            raise
        try:
            free = free_bytes(path)
        except OSError:
            free = None
        if not (isinstance(e, DiskFull) or is_full(e) or (free is not None and free < max(nbytes, 1 << 16))):
            raise
        needs = f"needs {size_text(nbytes)}{why}, " if nbytes else ""
        have = f"{size_text(free)} free" if free is not None else "the disk is full"
        raise DiskFull(f"{path}: the disk filled up while writing it ({needs}{have}); free some space or use "
                       f"another directory, then rerun") from None
