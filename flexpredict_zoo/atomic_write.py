"""Atomic writes: every output goes to a temporary name beside its destination and is renamed into place, so a
failure leaves no half-written file or folder. Outputs get the ordinary permissions of the user's umask, not the
private ones that mkstemp, mkdtemp and safetensors give their files."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(temporary_path)` writes the content; it then replaces `path` in one rename. Returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temp))
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_folder_atomically(out_dir: Path, files: Dict[str, Callable[[Path], None]], overwrite: bool) -> None:
    """Write each `files[name](path)` into a temporary folder beside `out_dir`, then move them into place."""
    existing = [name for name in files if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {existing}; choose another --out folder or overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = _umask()
    os.chmod(tmp, 0o777 & ~umask)
    try:
        for name, write in files.items():
            write(tmp / name)
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


def remove_stale_temporaries(folder: Path) -> int:
    """Remove the temporary files that `write_file_atomically` leaves in `folder` when its process is killed
    (kill -9, a lost node); call it only while nothing else writes there. Returns how many were removed."""
    removed = 0
    for temp in Path(folder).glob(".*.tmp"):
        if temp.is_file():
            temp.unlink(missing_ok=True)
            removed += 1
    return removed
