"""One process per output: an advisory lock that names its holder.

Every long job that writes an output (a feature file or store, a training run folder, a converted or exported
model folder) holds `output_lock` for it, so a second process aimed at the same output fails at once with an
error that names the first (pid, host, command, start time) instead of silently replacing its result or mixing
its files with them. The lock is `flock` on a small file: the operating system releases it when the holder dies
(kill -9 included), so a crashed run never blocks the rerun; the file itself is removed on release.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import glob
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Union

from .atomic_write import remove_stale_temporaries

__all__ = ["OutputInUseError", "output_lock", "lock_path_beside", "claim_output"]

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)
_HELD_HERE: Dict[str, list] = {}  # lock files this process holds: real path -> [holders here, open handle]


class OutputInUseError(OSError):
    """Another process holds the lock of the output this one was asked to write."""


def lock_path_beside(output: PathLike) -> Path:
    """The lock file of an output that is replaced as a whole (a file, a converted folder): `.NAME.lock` beside it."""
    output = Path(output)
    return output.parent / f".{output.name}.lock"


def _holder() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                       "since": datetime.datetime.now().isoformat(timespec="seconds")})


def _describe(lock_file: Path) -> str:
    try:
        holder = json.loads(lock_file.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder.get("pid"):
        return "another process"
    command = holder.get("command") or "?"
    return (f"process {holder['pid']} on {holder.get('host', '?')}, running `{command}` since "
            f"{holder.get('since', '?')}")


@contextlib.contextmanager
def output_lock(lock_file: PathLike, output: PathLike, job: str = "process",
                error: type = OutputInUseError) -> Iterator[None]:
    """Hold `lock_file` (created if missing) while this process writes `output`; `job` names what writes it in the
    error ("extraction", "training run", ...), raised as `error` (a subclass of OutputInUseError) when another
    process holds the lock. Within one process the lock is shared (a notebook that builds a second Trainer for
    the same run before the first is garbage collected): it is released when its last holder lets go."""
    lock_file, output = Path(lock_file), Path(output)
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): one writer per output is then up to the user
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(lock_file)
    if key not in _HELD_HERE:
        handle = _acquire(fcntl, lock_file, output, job, error)
        if handle is None:  # no locks on this file system (warned)
            yield
            return
        _HELD_HERE[key] = [0, handle]
    _HELD_HERE[key][0] += 1
    try:
        yield
    finally:
        _HELD_HERE[key][0] -= 1
        if _HELD_HERE[key][0] == 0:
            handle = _HELD_HERE.pop(key)[1]
            with contextlib.suppress(OSError):
                lock_file.unlink()  # while still holding it: a waiting process sees the inode change and retries
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


@contextlib.contextmanager
def claim_output(output: PathLike, job: str, overwrite: bool = False,
                 names: Optional[Iterable[str]] = None) -> Iterator[Path]:
    """The guard of an output replaced as a whole (a file, a model folder, show's folder), held while it is
    written: its lock (`.NAME.lock` beside it, `output_lock`, naming `job`); then the removal of the temporaries
    a killed writer of this output left beside it (this output's only); then, unless `overwrite`, the refusal of
    an existing output (FileExistsError, one message). Cleanup and check come after the lock, so they see no
    living writer. `names`: the files the job writes into the folder `output` (None: `output` is one file; empty:
    nothing is refused). Yields `output` as a Path."""
    output = Path(output)
    made = [folder for folder in (output.parent, *output.parent.parents) if not folder.exists()]
    try:
        with output_lock(lock_path_beside(output), output, job):
            remove_stale_temporaries(output.parent, [glob.escape(output.name)])
            _refuse_existing(output, overwrite, names)
            yield output
    except BaseException:
        for folder in made:  # the folders the lock file needed, if the job failed before writing into them
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise


def _refuse_existing(output: Path, overwrite: bool, names: Optional[Iterable[str]]) -> None:
    if overwrite:
        return
    if names is None:
        if output.exists():
            raise FileExistsError(f"{output} exists; pass --overwrite to replace it or choose another --out")
        return
    existing = [name for name in names if (output / name).exists()]
    if existing:
        raise FileExistsError(f"{output} already holds {', '.join(existing)}; pass --overwrite (overwrite=True in "
                              f"Python) to replace them or choose another --out folder")


def _forget_inherited_locks() -> None:
    """In a forked child (DataLoader workers): close the inherited lock files. flock belongs to the open file
    description, so a child keeping it open would hold its parent's lock after the parent died (kill -9) until the
    child noticed; closing the child's copy leaves the parent's lock as it is."""
    for _, handle in _HELD_HERE.values():
        with contextlib.suppress(OSError):
            handle.close()
    _HELD_HERE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_locks)


def _acquire(fcntl, lock_file: Path, output: Path, job: str, error: type):
    while True:
        handle = open(lock_file, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as failure:
            handle.close()
            if failure.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                # the file system has no locks (some Lustre/NFS mounts): running is better than refusing for ever
                logger.warning("cannot lock %s (%s): this file system has no file locks, so nothing stops a second "
                               "process from writing %s at the same time", lock_file, failure.strerror, output)
                return None
            raise error(f"{output} is in use: {_describe(lock_file)} is writing it (lock {lock_file}); wait for that "
                        f"{job} to finish or stop it, or choose another output") from None
        # the previous holder may have removed the file between our open and our lock: then we hold a lock on a
        # file nobody else will open, so start again on the current one
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(_holder())
    handle.flush()
    return handle


def read_holder(lock_file: PathLike) -> Optional[dict]:
    """The holder record in a lock file (None if absent or unreadable): for tests and diagnostics."""
    try:
        return json.loads(Path(lock_file).read_text() or "null")
    except (OSError, ValueError):
        return None
