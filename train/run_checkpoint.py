"""Training checkpoints: atomic writes, exact-resume state (RNG states), finding and reading checkpoints.

A checkpoint holds tensors and plain Python types only, so `torch.load(path, weights_only=True)` reads it.
Layout: RUN_DIR/checkpoints/latest.pt and RUN_DIR/checkpoints/iter_XXXXXXX.pt.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from flexpredict_zoo.atomic_write import write_file_atomically
from flexpredict_zoo.checkpoints import CheckpointError, load_file

PathLike = Union[str, Path]
LATEST = "latest.pt"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


def checkpoint_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def periodic_name(iteration: int) -> str:
    return f"iter_{iteration:07d}.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(state: Mapping[str, Any], path: PathLike, also: Optional[PathLike] = None) -> Path:
    """torch.save through atomic_write (a temporary file in the same folder, renamed into place), fsynced before
    the rename: a crash at any moment leaves either the old file or the new one, never a torn one. `also` gets the
    same bytes (a hard link when possible, else a copy), also renamed into place."""
    path = Path(path)

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())

    write_file_atomically(path, write)
    if also is not None:
        write_file_atomically(Path(also), lambda temporary: _link_or_copy(path, temporary))
    _fsync_dir(path.parent)
    return path


def _link_or_copy(source: Path, destination: Path) -> None:
    destination.unlink()  # the empty placeholder atomic_write reserved: the link takes its (unique) name
    try:
        os.link(source, destination)
    except OSError:  # no hard links on this file system
        shutil.copyfile(source, destination)


# ----------------------------------------------------------------------------------------------- RNG state

def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": _plain_python_state(random.getstate()),
        # numpy's state holds an ndarray: stored as a list so weights_only loading accepts it
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def rng_states_of_all_ranks() -> List[Dict[str, Any]]:
    """rng_state() of every rank, in rank order (all ranks must call it; one state without a process group)."""
    state = rng_state()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [state]
    states: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def _plain_python_state(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------------------------- loading

def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"checkpoint {path} does not exist")
    try:  # the zoo's one safe reader: weights_only, and a message that never advises weights_only=False
        return load_file(path)
    except CheckpointError as e:  # torn or foreign file
        raise ResumeError(f"cannot read checkpoint {path}: it is not a checkpoint written by flexpredict-train, or it "
                          f"is truncated or corrupt; pass another one with run.resume=PATH") from e


def find_resume_checkpoint(run_dir: PathLike, resume: Union[bool, str]) -> Optional[Path]:
    """run.resume: "auto"/true -> RUN_DIR/checkpoints/latest.pt if present (true requires it); false -> None;
    a path -> that file."""
    if resume is False:
        return None
    latest = checkpoint_dir(run_dir) / LATEST
    if resume == "auto" or resume is True:
        if latest.is_file():
            return latest
        if resume is True:
            raise ResumeError(f"run.resume=true but {latest} does not exist; use run.resume=auto to start fresh")
        return None
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise ResumeError(f"run.resume={resume}: no such checkpoint file")
    return path
