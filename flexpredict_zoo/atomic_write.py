"""Atomic writes: every output goes to a temporary name beside its destination and is renamed into place, so a
failure leaves no half-written file or folder. Outputs get the ordinary permissions of the user's umask, not the
private ones that mkstemp, mkdtemp and safetensors give their files."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


class DiskFullError(OSError):
    """The file system of an output is full (or over quota); what was there before is unchanged."""

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from or during, says the disk is full. torch.save reports it as
    `RuntimeError: ... unexpected pos` with the OSError as its context; safetensors as `SafetensorError: ... No
    space left on device (os error 28)`."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(path: Union[str, Path], what: Optional[str] = None) -> DiskFullError:
    """The one message for a full disk: where, what was not written, and that the previous state is kept."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return DiskFullError(errno.ENOSPC, f"no space left on device at {folder}: {what or path} was not written "
                                       f"(what was there before is unchanged); free space there or choose another "
                                       f"output, then run the command again", str(path))


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(temporary_path)` writes the content; it then replaces `path` in one rename. Returns `path`.
    On a full disk the temporary file is removed and DiskFullError names the place; `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temp))
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        if isinstance(error, Exception) and not isinstance(error, DiskFullError) and is_disk_full(error):
            raise disk_full_error(path) from None
        raise
    return path


def write_folder_atomically(out_dir: Path, files: Dict[str, Callable[[Path], None]]) -> None:
    """Write each `files[name](path)` into a temporary folder beside `out_dir`, then move them into place,
    replacing files of those names. Callers refuse existing files first, under the folder's lock
    (locks.claim_output)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = _umask()
    os.chmod(tmp, 0o777 & ~umask)
    try:
        for name, write in files.items():
            try:
                write(tmp / name)
            except Exception as error:
                if is_disk_full(error) and not isinstance(error, DiskFullError):
                    raise disk_full_error(out_dir / name) from None
                raise
            os.chmod(tmp / name, 0o666 & ~umask)
        if not out_dir.exists():
            os.replace(tmp, out_dir)
            return
        if not out_dir.is_dir():
            raise NotADirectoryError(f"{out_dir} exists and is not a folder")
        for name in files:  # weights first, config last: a config never points at missing weights
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and prove that a file can be written in it, before any long job writes there; an
    error names the folder and says what to do."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise PermissionError(f"cannot write to the output folder {str(folder)!r} ({type(error).__name__}: "
                              f"{error.strerror or error}); choose another output path or fix its "
                              f"permissions") from None


_RANDOM = "[a-z0-9_]" * 8


def remove_stale_temporaries(folder: Path, names: Sequence[str]) -> List[Path]:
    """Remove what a killed process left in `folder` while writing the outputs `names` (glob patterns of output
    names: "latest.pt", "shard-*.safetensors"; pass glob.escape(name) for a user's name): the temporary files and
    folders of `write_file_atomically` / `write_folder_atomically` (`.NAME.XXXXXXXX.tmp`) and those of earlier
    versions (`.NAME.tmp.PID`). Only those: other files, and other programs' temporaries, are never touched. Call
    it only while holding the output's lock (locks.output_lock; locks.claim_output does both), so no living writer
    is using them. Returns the removed paths."""
    folder = Path(folder)
    removed: List[Path] = []
    if not folder.is_dir():
        return removed
    for name in names:
        # mkstemp/mkdtemp add exactly 8 characters of [a-z0-9_]: `.model.v2.ab12cd34.tmp`, the live temporary
        # of a sibling output `model.v2`, must not match the name `model`
        for pattern in (f".{name}.{_RANDOM}.tmp", f".{name}.tmp.[0-9]*"):
            for temp in folder.glob(pattern):
                if temp.is_dir() and not temp.is_symlink():
                    shutil.rmtree(temp, ignore_errors=True)
                else:
                    temp.unlink(missing_ok=True)
                removed.append(temp)
    return removed
