"""Atomic writes: ``write_atomically`` for single files, ``write_directory_atomically`` / ``atomic_directory`` for
directories (every model and checkpoint writer), ``recover_directory`` on the reader's side (a loader calls it first),
and ``remove_directory``. A reader sees an old file or directory or a new one, complete, never a mix."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_NO_DIR_FSYNC = (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM)


def fsync_directory(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` (names created, renamed or removed in it) durable.

    Filesystems that cannot fsync a directory (some network and FUSE ones answer EINVAL) are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno in _NO_DIR_FSYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every regular file under directory ``path``, then every directory, ``path`` last (links not followed)."""
    dirs = []
    for here, _, files in os.walk(path):
        for name in files:
            f = os.path.join(here, name)
            if os.path.isfile(f) and not os.path.islink(f):
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        dirs.append(here)
    for d in reversed(dirs):  # deepest first: a directory after the entries in it
        fsync_directory(d)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, fsync it, rename it over ``path`` and fsync the folder: a
    reader sees the old file or the new one, never half of one, and once this returns the new one survives a crash
    of the machine too. If ``write`` fails the temporary file is removed and ``path`` is untouched. The temporary
    file is named ``<name>.tmp-<pid>-<random>``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)
    return path


# Siblings of a directory D being written, in D's parent: ".D.tmp-<pid>-<hex8>" (the new contents, being written),
# ".D.old-<pid>-<hex8>" (the previous D, moved aside for the instant between the two renames) and ".D.del-<pid>-<hex8>"
# (a D that is being deleted). <pid> is the writer's process id.
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _absolute(path: str | os.PathLike) -> Path:
    path = Path(os.path.abspath(path))
    if not path.name:
        raise ValueError(f"{path} has no name: a directory written atomically needs a parent")
    return path


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _siblings(path: Path) -> list[tuple[Path, str, int]]:
    """(sibling, kind, writer pid) of every temporary / moved-aside / being-deleted sibling of ``path``."""
    try:
        names = os.listdir(path.parent)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    found = []
    for name in names:
        m = _SIBLING.match(name)
        if m and m.group("name") == path.name:
            found.append((path.parent / name, m.group("kind"), int(m.group("pid"))))
    return found


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (this process counts: another thread may be writing)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _discard(entry: Path, target: Path) -> None:
    """Delete ``entry`` (a sibling of ``target``, or ``target`` itself) by renaming it to a ``.del-`` sibling first:
    a partly deleted directory never carries a name that a reader or ``recover_directory`` would use."""
    trash = _sibling(target, "del")
    try:
        os.rename(entry, trash)
    except FileNotFoundError:  # someone else moved or deleted it
        return
    _remove(trash)


def recover_directory(path: str | os.PathLike, wait_s: float = 5.0) -> Path:
    """Undo what a writer of directory ``path`` (``write_directory_atomically``) left when it was killed; a loader
    calls this first. Returns ``path``.

    - ``path`` missing but a ``.old-`` sibling present: the writer was killed between its two renames, and that
      sibling is the previous complete directory: it is renamed back to ``path`` (the most recently moved aside if
      there are several). If its writer still runs on this machine (the instant between the renames), this waits
      up to ``wait_s`` seconds for the new directory to appear instead.
    - Then every ``.tmp-`` (unfinished new contents), ``.old-`` (a previous version, now superseded) and ``.del-``
      (a deletion cut short) sibling of ``path`` whose writer no longer runs is removed.

    A writer's liveness is judged by its process id on this machine, so a writer on another machine sharing the
    folder must not run at the same time. Several processes may recover the same ``path`` at once. Needs no write
    permission when there is nothing to recover."""
    path = _absolute(path)
    found = _siblings(path)
    if not found:
        return path
    olds = [(p, pid) for p, kind, pid in found if kind == "old"]
    if olds and not os.path.lexists(path):
        deadline = time.monotonic() + wait_s
        while not os.path.lexists(path) and time.monotonic() < deadline and any(_alive(pid) for _, pid in olds):
            time.sleep(0.01)
        if not os.path.lexists(path):
            for old, _ in sorted(olds, key=lambda o: _ctime(o[0]), reverse=True):
                try:
                    os.rename(old, path)
                except FileNotFoundError:  # another process recovered (or removed) this one
                    continue
                except OSError:
                    if os.path.lexists(path):  # another process put a directory back first
                        break
                    raise
                fsync_directory(path.parent)
                break
    present = os.path.lexists(path)
    for entry, kind, pid in found:
        if _alive(pid) or (kind == "old" and not present):  # an .old- sibling is garbage only next to a new one
            continue
        if kind == "del":
            _remove(entry)
        else:
            _discard(entry, path)
    return path


def _ctime(path: Path) -> float:
    try:
        return path.stat().st_ctime  # a rename updates it: the latest moved aside is the newest version
    except FileNotFoundError:
        return 0.0


def recover_directories(parent: str | os.PathLike) -> None:
    """``recover_directory`` for every directory of ``parent`` that has writer leftovers (e.g. a checkpoint root
    holding ``step-XXXXXXXX`` directories)."""
    try:
        names = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    for name in sorted({m.group("name") for m in map(_SIBLING.match, names) if m}):
        recover_directory(Path(parent) / name)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_directory(path) as tmp:`` fill the new directory ``tmp``; on a normal exit it replaces
    ``path`` as ``write_directory_atomically`` describes, on an exception ``tmp`` is removed and ``path`` is left as
    it was. For writes that cannot be one callable (several processes writing into ``tmp``)."""
    path = _absolute(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if not os.path.lexists(path):
            os.rename(tmp, path)
            fsync_directory(path.parent)
            return
        old = _sibling(path, "old")
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(old, path)  # put the previous directory back
            raise
        fsync_directory(path.parent)
    except BaseException:
        _remove(tmp)
        raise
    _discard(old, path)


def write_directory_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Replace directory ``path`` by one that ``write(tmp)`` fills, so that no crash leaves it missing or mixed.

    ``write(tmp)`` fills ``tmp``, a new sibling ``.<name>.tmp-<pid>-<random>`` (same folder: renames are atomic).
    Every file and folder in it is then fsynced, and it is renamed to ``path``: with one ``os.rename`` if ``path``
    does not exist; otherwise the old ``path`` is renamed to ``.<name>.old-<pid>-<random>``, ``tmp`` to ``path``,
    the parent is fsynced and only then is the old one deleted (renamed to ``.<name>.del-...`` first).

    The guarantee, for a writer killed at any instant (or a machine that loses power: the fsyncs order the writes):
    ``path`` holds the complete old directory or the complete new one, except between the two renames, when it is
    missing and the complete old one is the ``.old-`` sibling; ``recover_directory(path)``, which every loader calls
    first, renames it back. Half-written, superseded or half-deleted siblings are only ever under ``.tmp-``,
    ``.old-`` (with ``path`` present) or ``.del-`` names, which ``recover_directory`` removes. If ``write`` raises,
    ``tmp`` is removed and ``path`` is untouched. Once this returns, the new directory is durable. One writer per
    ``path`` at a time. Returns ``path``."""
    with atomic_directory(path) as tmp:
        write(tmp)
    return Path(path)


def remove_directory(path: str | os.PathLike) -> None:
    """Delete directory ``path`` so that a kill midway leaves no partial directory under its name: it is renamed to a
    ``.del-`` sibling (the parent fsynced), then removed; ``recover_directory`` finishes a cut-short removal."""
    path = recover_directory(path)
    if not os.path.lexists(path):
        return
    trash = _sibling(path, "del")
    os.rename(path, trash)
    fsync_directory(path.parent)
    _remove(trash)
