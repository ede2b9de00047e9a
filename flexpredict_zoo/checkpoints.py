"""Safe reading of FlexPredict weight files: official training checkpoints, safetensors, converted folders.

Nothing here unpickles arbitrary objects: torch files are read with ``weights_only=True`` and, where the
file is a zip archive, memory-mapped, so taking the encoder out of a training checkpoint touches only the
encoder's bytes (not the optimizer state).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

PathLike = Union[str, Path]
ENCODER_KEYS = ("target_encoder", "encoder")
SAFETENSORS_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """A weight file that cannot be used; the message says why and what to do."""


DOWNLOAD_AGAIN = "delete it and download it again (`flexpredict-zoo download MODEL --force`)"
# a file shipped inside the package cannot be downloaded again: the installation itself is damaged
REINSTALL = ("it is shipped inside the flexpredict-zoo package, so reinstall the package (`pip install "
             "--force-reinstall --no-deps flexpredict-zoo`; in a git checkout, `git checkout -- flexpredict_zoo/weights`)")


class ChecksumError(CheckpointError):
    def __init__(self, path: PathLike, expected: str, actual: str, advice: str = DOWNLOAD_AGAIN):
        self.path, self.expected, self.actual = str(path), expected, actual
        super().__init__(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}. The file was not used. "
            f"It is corrupt or not the released file: {advice}.")


class CheckpointMismatchError(CheckpointError):
    """The weights do not fit the architecture (e.g. ViT-L weights for a ViT-B model)."""


def sha256_file(path: PathLike, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: PathLike, expected: Optional[str], advice: str = DOWNLOAD_AGAIN) -> Optional[str]:
    """Raise ChecksumError (with `advice`: what fixes the file) when `expected` is given and differs; return the
    actual digest (None if not checked)."""
    if not expected:
        return None
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ChecksumError(path, expected, actual, advice)
    return actual


def resolve_weight_file(path: PathLike) -> Path:
    """A file, or a folder written by `flexpredict-zoo convert` (holding model.safetensors)."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidate = path / SAFETENSORS_NAME
        if not candidate.is_file():
            raise CheckpointError(f"{path} is a folder without {SAFETENSORS_NAME}; pass the weight file itself or a "
                                  f"folder written by `flexpredict-zoo convert`")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist")
    return path


def read_safetensors_header(path: PathLike) -> Tuple[Dict[str, Any], int]:
    """(header, offset of the data) of a safetensors file: 8 bytes little-endian header length, the JSON header
    ({name: {dtype, shape, data_offsets}, "__metadata__": {...}}), then the tensors' bytes. ValueError otherwise."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > os.path.getsize(path) - 8:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, struct.error) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    return header, 8 + length


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str]) -> Path:
    """safetensors' `save_file`, with bytes that depend on the input only: safetensors writes the metadata in the
    order of a Rust hash map, which changes from process to process (one run exported three times gave three
    sha256), so the header is rewritten in place with the metadata keys sorted. Returns `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(dict(tensors), str(path), metadata={str(k): str(v) for k, v in metadata.items()})
    header, data_start = read_safetensors_header(path)
    stored = header.pop("__metadata__", None) or {}
    ordered = {"__metadata__": dict(sorted(stored.items())), **header} if stored else header  # tensors keep their order
    # Compact, non-ASCII kept: the serialization safetensors (serde_json) uses, so the header keeps its length.
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    room = data_start - 8
    if len(text) > room:
        raise RuntimeError(f"rewriting the header of {path} in sorted order made it longer ({len(text)} > {room} "
                           f"bytes); this safetensors version serializes headers differently, please report it")
    with open(path, "r+b") as handle:
        handle.seek(8)
        handle.write(text + b" " * (room - len(text)))  # safetensors pads its header with spaces too
    return path


def _is_safetensors(path: Path) -> bool:
    """The safetensors layout, whatever the file's name."""
    try:
        read_safetensors_header(path)
    except ValueError:
        return False
    return True


def load_file(path: PathLike) -> Dict[str, Any]:
    """Read a weight file without unpickling arbitrary objects; corrupt or unsafe files raise CheckpointError."""
    path = resolve_weight_file(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): it was never written completely (an interrupted download, "
                              f"copy or save); delete it and download, export or save it again")
    if path.suffix == ".safetensors" or _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt: "
                                  f"download or export it again") from e
    mmap = zipfile.is_zipfile(path)  # torch's zip format can be memory-mapped; the legacy format cannot
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch raises UnpicklingError both for a disallowed global (an object we refuse to build) and for
        # bytes that are no pickle at all (a corrupt file); only the first is a safety refusal.
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        if unsafe is None:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (its pickle data is invalid); it "
                                  f"is truncated or corrupt: delete it and download it again") from e
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain containers "
            f"(first one: {unsafe.group(1)}), and loading it would run arbitrary code. Only load weights you "
            f"trust; convert a trusted checkpoint to safetensors first") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]  # EOFError often has no message
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({reason}); it is truncated or corrupt: "
                              f"delete it and download it again") from e
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a dict of weights: pass a training "
                              f"checkpoint (a dict with {' or '.join(ENCODER_KEYS)}) or a state dict of tensors")
    return checkpoint


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> Dict[str, Any]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def is_training_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    return any(key in checkpoint and isinstance(checkpoint[key], Mapping) for key in ENCODER_KEYS)


def encoder_state_dict(checkpoint: Mapping[str, Any], encoder: str = "target_encoder",
                       source: Optional[PathLike] = None) -> Dict[str, Any]:
    """The encoder weights (without 'module.') of an official training checkpoint, or a plain state dict as is.
    `source` (the file the checkpoint came from) is named in errors."""
    if encoder not in ENCODER_KEYS:
        raise ValueError(f"encoder must be one of {ENCODER_KEYS}, got {encoder!r}")
    what = f"{source}" if source is not None else "the checkpoint"
    if is_training_checkpoint(checkpoint):
        if encoder not in checkpoint:
            raise CheckpointError(f"{what} has no {encoder!r} entry; it has {sorted(checkpoint)}")
        return strip_prefix(checkpoint[encoder])
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"no encoder weights found in {what}: it holds {sorted(checkpoint)[:10]}, neither a "
                              f"FlexPredict training checkpoint (with {ENCODER_KEYS}) nor a state dict of tensors")
    return strip_prefix(tensors)


def _mismatches(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                optional_prefixes: tuple = ()) -> Tuple[List[str], List[str], List[str]]:
    """(shape mismatches, missing keys, unexpected keys) of weights against an architecture's state dict."""
    missing = [k for k in expected if k not in state_dict and not k.startswith(optional_prefixes)]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    return shapes, missing, unexpected


def mismatch_summary(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """One line on how weights differ from an architecture: the counts, and the first of each kind."""
    parts = []
    for title, items in zip(("shape mismatches", "missing keys", "unexpected keys"),
                            _mismatches(state_dict, expected)):
        if items:
            parts.append(f"{len(items)} {title} (first: {items[0]})")
    return "; ".join(parts) or "no differences in keys or shapes"


def check_fits(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
               optional_prefixes: tuple = ("head.",), what: str = "the model",
               source: Optional[PathLike] = None) -> None:
    """Raise CheckpointMismatchError naming the keys and shapes that differ between weights and architecture, and
    `source`, the file the weights came from."""
    shapes, missing, unexpected = _mismatches(state_dict, expected, optional_prefixes)
    if not (missing or unexpected or shapes):
        return
    lines = []
    for title, items in (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            shown = "\n    ".join(items[:8]) + (f"\n    ... and {len(items) - 8} more" if len(items) > 8 else "")
            lines.append(f"  {len(items)} {title}:\n    {shown}")
    raise CheckpointMismatchError(
        f"the weights {f'in {source} ' if source is not None else ''}do not fit {what}:\n" + "\n".join(lines) +
        "\nCheck that the file is for this architecture (e.g. vit-l16 weights need flexpredict_vit_l16).")
