"""Crash-safe writes: a reader never sees half an artifact.

Files and directories are written under a temporary name in the same directory, fsynced,
then moved into place with `os.replace` (atomic on POSIX within one filesystem).

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "dataset") as tmp:
    ...     _ = (tmp / "a.txt").write_text("hello")
    >>> sorted(p.name for p in root.iterdir())
    ['dataset']
    >>> atomic_write_text(root / "CURRENT", "v1\\n"); (root / "CURRENT").read_text()
    'v1\\n'
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_directory(path: Path) -> None:
    """Flush a directory entry (the rename itself) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, then `root` itself."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(Path(dirpath))


def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old content or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.chmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give what open() would
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block succeeds.

    With `overwrite`, an existing `final` is first renamed aside, to a name of its own
    (``.tmp-<name>.old-<pid>-<random>``, so no leftover of an earlier run can be in the
    way), then the new directory is renamed in, then the old one is removed. A process
    killed between the two renames leaves no `final`: `recover_interrupted_replace` puts
    the old one back.

    Args:
        final: the directory to create.
        overwrite: replace an existing `final` (the old one is removed after the swap).

    Raises:
        FileExistsError: `final` exists and `overwrite` is false.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; readers of other uids need it
    try:
        yield tmp
        fsync_tree(tmp)
        old: Path | None = None
        if final.exists() or final.is_symlink():
            old = final.with_name(
                f"{TMP_PREFIX}{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            )
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_directory(final.parent)
        if old is not None:
            _remove_entry(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_entry(path: Path) -> None:
    """Delete a file, a link or a directory tree (what was moved aside may be any)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _moved_aside(final: Path) -> list[Path]:
    """What `atomic_directory(overwrite=True)` moved aside for `final`, latest move last
    (a rename sets the entry's ctime; the name breaks ties)."""
    found = []
    for path in final.parent.glob(f"{TMP_PREFIX}{final.name}.old-*"):
        with contextlib.suppress(FileNotFoundError):
            found.append((path.lstat().st_ctime_ns, path.name, path))
    return [path for _, _, path in sorted(found)]


def interrupted_replace_pending(final: str | Path) -> bool:
    """True when `final` is missing and a moved-aside old copy of it is there: a process
    died between the two renames of `atomic_directory(overwrite=True)`, and
    `recover_interrupted_replace` would put the old `final` back.

    A job that writes `final` at its end asks this at its start, where a refusal costs
    nothing (the restored `final` would make a write without `overwrite` fail at the end).
    """
    final = Path(final)
    return not (final.exists() or final.is_symlink()) and bool(_moved_aside(final))


def recover_interrupted_replace(final: str | Path) -> bool:
    """Put back the old `final` when a process died inside `atomic_directory(overwrite=True)`
    between moving the old directory aside and moving the new one in; True if it did.

    The latest moved-aside copy is put back (several exist only after several such deaths
    with no recovery between them). Run it for every path before
    `remove_stale_temporaries`, which deletes what is still aside.
    """
    final = Path(final)
    if not interrupted_replace_pending(final):
        return False
    os.replace(_moved_aside(final)[-1], final)
    fsync_directory(final.parent)
    return True


def remove_stale_temporaries(directory: str | Path, name: str | None = None) -> list[Path]:
    """Delete leftovers of interrupted atomic writes in `directory`; return what was removed.

    Args:
        directory: where the interrupted writes happened.
        name: only the leftovers of writes of `directory/name` (`atomic_directory` and
            `atomic_write_bytes` temporaries: ``.tmp-<name>.*``); default: every one.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    prefix = TMP_PREFIX if name is None else f"{TMP_PREFIX}{name}."
    for entry in directory.iterdir():
        if entry.name.startswith(prefix):
            _remove_entry(entry)
            removed.append(entry)
    return removed


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (artifact manifests record these)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def check_listed_files(
    root: Path, listed: Iterable[str], present: Iterable[str], error: type[Exception]
) -> None:
    """Raise `error` unless the files `present` in the artifact directory `root` are exactly
    those its manifest `listed` (relative POSIX paths): a missing file means a damaged
    artifact, an extra one a tampered (or half-replaced) one.

    >>> check_listed_files(Path("v"), ["a", "b"], ["a"], ValueError)
    Traceback (most recent call last):
    ...
    ValueError: v: files listed in the manifest are missing: ['b']
    """
    listed, present = set(listed), set(present)
    missing = sorted(listed - present)
    if missing:
        raise error(f"{root}: files listed in the manifest are missing: {missing}")
    extra = sorted(present - listed)
    if extra:
        raise error(f"{root}: files not listed in the manifest: {extra}")
