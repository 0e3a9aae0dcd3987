"""Writing files so that nothing is lost, and saying in one line why a write failed.

Every file the kit writes goes through `write_file` / `write_with` (one file) or `folder_aside` (a folder of
files): it is written next to its place under a hidden temporary name, synced to disk and renamed into place, so
the place holds the old file (or nothing) until the new one is complete. A failure removes the temporary file and
raises `WriteError`, an OSError that names the file and what it held ("the prior images", "checkpoint step 4").
Libraries report a full disk in their own words (safetensors' SafetensorError "... os error 28", torch.save's
RuntimeError); they become the same WriteError with its errno.

`describe(err)` turns such an error (any OSError of a write: no space, read-only, no permission) into the one line
every command prints, with the free space of the disk it struck; `WRITE_FAILED` (74, EX_IOERR of sysexits.h) is
the exit code of a command that stopped because a write failed, 2 staying the code of a bad input.

Torch-free: `amused-tune push` imports it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

WRITE_FAILED = 74  # exit code: a write failed (the disk, not the input); rerunning after the fix continues
TMP_PREFIX = ".tmp-"  # the hidden names files and folders are written under before the rename
OLD_PREFIX = ".old-"  # a folder being replaced, until the new one is in place
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class WriteError(OSError):
    """A write that failed: its errno, the file (its final place, not the temporary one) and what it held."""

    def __init__(self, code: int, path: str | os.PathLike, what: str):
        super().__init__(code, os.strerror(code), str(path))
        self.what = what


def tmp_name(path: Path, prefix: str = TMP_PREFIX) -> Path:
    """The hidden name next to `path` that a write goes to first (`.tmp-NAME-PID`); with OLD_PREFIX: where a
    folder being replaced waits until the new one is in place."""
    return path.with_name(f"{prefix}{path.name}-{os.getpid()}")


def is_write_failure(err: BaseException) -> bool:
    """Whether `err` is a failed write (a WriteError), or an OSError of a full disk, a read-only file system or a
    missing permission."""
    return isinstance(err, WriteError) or (isinstance(err, OSError) and err.errno in WRITE_ERRNOS)


def as_write_error(err: BaseException, path: str | os.PathLike, what: str) -> WriteError | None:
    """`err`, raised while writing `path`, as a WriteError; None when it shows no sign of a failed write (a bug in
    the writer keeps its own traceback). A library's own exception type is read for its errno ("os error 28", "No
    space left"); one that names none (torch.save's "unexpected pos") on a disk with no room left is a full disk."""
    if isinstance(err, WriteError):
        return err
    if isinstance(err, OSError):
        return WriteError(err.errno or errno.EIO, path, what)
    text = str(err)
    found = re.search(r"os error (\d+)", text)
    code = int(found.group(1)) if found else errno.ENOSPC if "No space left" in text else None
    if code is None and free_bytes(path) == 0:
        code = errno.ENOSPC
    return None if code is None else WriteError(code, path, what)


def _raise_write_error(err: BaseException, path: str | os.PathLike, what: str):
    """Raise `err` as a WriteError (from inside its except block), or as it is when it is no failed write."""
    converted = as_write_error(err, path, what)
    if converted is None:
        raise err
    raise converted from err


def sync(path: Path) -> None:
    """Flush a written file to the disk (where a full disk may show only now)."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _sync_folder(path: Path) -> None:
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


def write_into(path: Path, writer: Callable[[Path], object], what: str, shown: Path | None = None) -> None:
    """Run `writer(path)` and sync the file, without a rename (for files of a folder written aside). A failure is
    a WriteError naming `shown` (the file's final place; default `path`)."""
    try:
        writer(path)
        sync(path)
    except Exception as err:  # noqa: BLE001 - a writer's failed write (any library's type) becomes a WriteError
        _raise_write_error(err, shown or path, what)


def write_with(path: str | os.PathLike, writer: Callable[[Path], object], what: str) -> Path:
    """Write `path` by calling `writer(tmp)` on a temporary name next to it, then rename it into place. Until the
    rename `path` keeps its old content (or stays absent); a failure removes the temporary file and raises
    WriteError. Returns `path`."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_into(tmp, writer, what, shown=path)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, Exception):
            _raise_write_error(err, path, what)
        raise
    _sync_folder(path.parent)
    return path


def write_file(path: str | os.PathLike, data: str | bytes, what: str) -> Path:
    """`write_with` for text (UTF-8) or bytes."""
    if isinstance(data, str):
        return write_with(path, lambda tmp: tmp.write_text(data, encoding="utf-8"), what)
    return write_with(path, lambda tmp: tmp.write_bytes(data), what)


@contextlib.contextmanager
def folder_aside(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Yield a temporary folder next to `path` to write a folder's files into (with `write_into`, or a library's
    save_pretrained); once the block ends, its files are synced and it is swapped into place (an old `path` is moved
    aside first and removed after). A failure removes the temporary folder, leaves `path` as it was and raises
    WriteError."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        for file in sorted(tmp.rglob("*")):  # every file on the disk before the rename (a library's too)
            if file.is_file():
                write_into(file, lambda _: None, what, shown=path / file.relative_to(tmp))
        _sync_folder(tmp)
        if path.exists():
            old = tmp_name(path, OLD_PREFIX)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.filename and str(tmp) in str(err.filename):
            err.filename = str(err.filename).replace(str(tmp), str(path))  # name the file's final place
        _raise_write_error(err, getattr(err, "filename", None) or path, what)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync_folder(path.parent)


# --------------------------------------------------------------------------------------------- the one line


def existing_folder(path: str | os.PathLike) -> Path:
    """The nearest folder of `path` (itself included) that exists."""
    here = Path(path).expanduser().absolute()
    return next((f for f in (here, *here.parents) if f.is_dir()), Path(here.anchor))


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the disk that holds `path` (its nearest existing folder), None when unknown."""
    try:
        return shutil.disk_usage(existing_folder(path)).free
    except OSError:
        return None


def size_text(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


REASONS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def what_failed(err: OSError) -> str:
    """What a failed write struck, where, and the free space on that disk (no advice)."""
    where = err.filename or "?"
    reason = REASONS.get(err.errno, (err.strerror or str(err)).lower())
    what = getattr(err, "what", "")
    free = free_bytes(where) if err.filename else None
    writing = isinstance(err, WriteError) or err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
    # (a permission error of no write the kit knows of may be a read: said without "writing")
    head = f"{reason} while writing {what + ' to ' if what else ''}{where}" if writing else f"{reason}: {where}"
    return head + (f" ({size_text(free)} free on that disk)" if free is not None else "")


def describe(err: OSError, elsewhere: str = "write to another folder", rerun: str = "rerun the same command") -> str:
    """The one line for a failed write: what failed, where, the free space there, and what to do.

    `elsewhere` is the command's way round a folder it cannot write ("pick another output.dir"), `rerun` what
    running it again does ("rerun the same command: it resumes from the last complete checkpoint").
    """
    line = what_failed(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{line}: free space (or {elsewhere}), then {rerun}"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{line}: make {existing_folder(err.filename or '.')} writable or {elsewhere}, then {rerun}"
    return f"{line}: check that disk, then {rerun}"
