"""Training checkpoints: atomic writes, exact-resume state, and starting from an official StoP checkpoint.

A checkpoint holds tensors and plain Python types only, so `torch.load(path, weights_only=True)` reads it.
Layout: RUN_DIR/checkpoints/latest.pt and RUN_DIR/checkpoints/iter_XXXXXXX.pt.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

from flexpredict_zoo.checkpoints import load_file, strip_prefix

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
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a crash at any moment leaves
    either the old file or the new one, never a torn one. `also` gets the same bytes (a hard link when possible)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        if also is not None:
            also = Path(also)
            also_tmp = also.with_name(f".{also.name}.tmp.{os.getpid()}")
            try:
                os.link(tmp, also_tmp)
            except OSError:  # no hard links on this file system
                shutil.copyfile(tmp, also_tmp)
            os.replace(also_tmp, also)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torn or foreign file
        raise ResumeError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); it is not a checkpoint written "
                          f"by flexpredict-train, or it is corrupt: pass another one with run.resume=PATH") from e


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


def load_official(path: PathLike, encoder: nn.Module, predictor: nn.Module, target_encoder: nn.Module) -> Dict[str, Any]:
    """Start from an official StoP training checkpoint: `encoder`, `predictor`, `target_encoder` (DDP `module.`
    keys), each loaded with strict=True. The encoders' fixed `pos_embed` is not a parameter here (it is
    regenerated exactly), so it is dropped. Returns the file's scalar metadata (epoch, loss, ...)."""
    ckpt = load_file(path)
    missing = [k for k in ("encoder", "predictor", "target_encoder") if k not in ckpt]
    if missing:
        raise ResumeError(f"run.init_from={path} is not an official StoP training checkpoint: it has no "
                          f"{', '.join(missing)} (keys found: {', '.join(map(str, ckpt))})")
    for key, module in (("encoder", encoder), ("target_encoder", target_encoder), ("predictor", predictor)):
        state = {k: v for k, v in strip_prefix(ckpt[key]).items() if not (module is not predictor and k == "pos_embed")}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ResumeError(f"run.init_from={path}: `{key}` does not fit the configured model ({e}). Set model.name "
                              f"and predictor.depth/embed_dim to the checkpoint's architecture") from None
    return {k: v for k, v in ckpt.items() if isinstance(v, (int, float, str))}
