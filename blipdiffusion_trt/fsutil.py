"""Small file helpers: bounded reading of regular files, JSON reading with one-line errors (and a
shape, :mod:`.schema`), atomic file writes and directory replacement, paths confined to a root,
and locks between processes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no locks, hence no detection of other writers or stale directories
    fcntl = None  # type: ignore[assignment]

# Whether this platform has the advisory locks :func:`locked` and :class:`StagingDir` use.
LOCKS_AVAILABLE = fcntl is not None

from .schema import Shape, check

logger = logging.getLogger(__name__)

# The largest JSON document read (a full-size package's manifest is ~20 KB).
MAX_JSON_BYTES = 16 << 20


def open_regular(path: str | os.PathLike, error: type[Exception], *, what: str = "file") -> IO[bytes]:
    """``path`` opened for reading, refusing anything but a regular file (a FIFO, a device, a
    directory) with ``error``: opened non-blocking, so a FIFO without a writer cannot hang the
    caller, then checked with ``fstat``."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise error(f"{path}: cannot open the {what} ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: not a regular file (the {what} must be a plain file, not a "
                        f"{_file_kind(info.st_mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def read_bounded(path: str | os.PathLike, error: type[Exception], *, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (checked before reading)."""
    with open_regular(path, error, what=what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes, more than the {max_bytes} a {what} may have")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{path}: more than the {max_bytes} bytes a {what} may have")
    return data


def read_json(path: Path, error: type[Exception], *, missing: str = "not found", what: str = "",
              shape: Shape | None = None, source: str | None = None, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """``json.loads`` of a file (a regular file of at most ``max_bytes``), checked against ``shape``;
    a missing, broken or wrongly shaped file raises ``error`` with a one-line message (naming
    ``source``, default the path)."""
    try:
        text = read_bounded(path, error, max_bytes=max_bytes, what=what or "JSON file")
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except OSError as exc:
        raise error(f"{path}: unreadable {what + ' ' if what else ''}({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{path}: unreadable {what + ' ' if what else ''}({reason})") from None
    if shape is not None:
        data = check(data, shape, source=source or str(path), error=error)
    return data


class OtherWriterError(Exception):
    """Another live process is writing the same target (see :func:`staging_dir`)."""


def _lock_dir(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on the directory ``path``; None when another
    process holds it (or where locks do not exist). The lock goes with the process: a killed
    writer's directory is unlocked."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _clear_leftovers(target: Path, mine: Path) -> None:
    """Remove the partial (and replaced) directories of ``target`` left by killed writers; a live
    writer's partial directory (locked) raises :class:`OtherWriterError`."""
    if fcntl is None:
        return
    live = []
    for sibling in sorted(target.parent.glob(f".{target.name}.partial-*")):
        if sibling == mine or not sibling.is_dir() or sibling.is_symlink():
            continue
        fd = _lock_dir(sibling)
        if fd is None:
            live.append(sibling)
            continue
        try:
            logger.info("removing %s, left by an interrupted run", sibling)
            shutil.rmtree(sibling, ignore_errors=True)
        finally:
            os.close(fd)
    if live:
        raise OtherWriterError(f"another process is writing {target} right now ({live[0].name}); "
                               f"wait for it to finish")
    for old in target.parent.glob(f".{target.name}.old-*"):  # no other writer: a replace was interrupted
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


class StagingDir:
    """A temporary sibling directory (:attr:`path`) in which to build ``target`` before
    :func:`replace_dir` moves it into place; :meth:`close` (or leaving the ``with`` block) removes
    whatever was not moved and releases it.

    - It has a normal directory's permissions (``0777 & ~umask``, not ``mkdtemp``'s 0700), so what
      is built is readable by other users like anything made with ``mkdir``.
    - It is locked while this process builds in it. Partial directories of the same target that
      no process holds were left by a killed run (SIGKILL, power loss) and are removed; one that a
      live process holds means two writers of one target, and ``error`` is raised: they cannot
      both win.
    """

    def __init__(self, target: str | os.PathLike, error: type[Exception]) -> None:
        self.target = Path(target)
        try:
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        except OSError as exc:
            raise error(f"cannot write in {self.target.parent}: {exc.strerror or exc}") from None
        self._fd: int | None = None
        try:
            os.chmod(self.path, 0o777 & ~current_umask())
            self._fd = _lock_dir(self.path)
            _clear_leftovers(self.target, self.path)
        except OtherWriterError as exc:
            self.close()
            raise error(str(exc)) from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.path.exists():  # not moved into place
            shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        self.close()


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing what was there (a directory, or a
    file or symlink: the link itself, never what it points to)."""
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        remove_entry(old)
    else:
        os.replace(src, dst)


def remove_entry(path: Path) -> None:
    """Remove ``path`` whatever it is: a directory tree, or a file or symlink (the link itself)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def confined_path(root: Path, path: Path, error: type[Exception], *, what: str) -> Path:
    """``path`` (under ``root``) unless, once symlinks are resolved, it leads outside ``root``:
    then ``error`` naming both. ``what`` names the root in the message ("package", "cache")."""
    try:
        real_root = Path(root).resolve(strict=True)
        real = Path(path).resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise error(f"{path}: cannot resolve ({exc})") from None
    if not real.is_relative_to(real_root):
        raise error(f"{path}: leads outside the {what} (to {real}); {what} files must be inside it")
    return Path(path)


class LockTimeout(Exception):
    """Another process held a lock (:func:`locked`) longer than the caller would wait."""


@contextmanager
def locked(path: Path, *, shared: bool = False, timeout: float | None = None) -> Iterator[bool]:
    """Hold an advisory lock on the file ``path`` (created if missing, never through a symlink)
    for the ``with`` block: exclusive, or ``shared`` with other shared holders. Waits for it (at
    most ``timeout`` seconds: :class:`LockTimeout`). Yields whether it holds the lock: False where
    locks do not exist or the lock file cannot be opened (a read-only folder), so readers go on.
    The lock goes with the process: a killed holder's lock is free."""
    if fcntl is None:
        yield False
        return
    flags = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666 & ~current_umask())
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY | flags)
        except OSError:
            yield False
            return
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        deadline = None if timeout is None else time.monotonic() + timeout
        delay, held = 0.01, False
        while not held:
            try:
                fcntl.flock(fd, mode | (fcntl.LOCK_NB if deadline is not None else 0))
                held = True
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockTimeout(f"another process held {path} for more than {timeout:g} s") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            except OSError:  # a file system without locks
                break
        yield held
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | memoryview, error: type[Exception]) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename: a reader never sees half a file.

    An ``OSError`` becomes ``error`` with a one-line message; the temporary file is removed.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise error(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def check_not_an_input(out: str | os.PathLike, inputs: dict[str, Any], error: type[Exception], *,
                       field: str = "--out") -> None:
    """``out`` (a directory a command replaces) must be none of ``inputs`` (name -> path) nor
    hold one of them: replacing it would delete what the command reads."""
    target = Path(out).resolve()
    for name, value in inputs.items():
        if not value:
            continue
        source = Path(value).resolve()
        if source == target or source.is_relative_to(target):
            raise error(f"{field} {out} would replace the {name} {value}; give another output directory")


def current_umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    umask = os.umask(0o22)
    os.umask(umask)
    return umask
