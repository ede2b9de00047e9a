"""Feature extraction, the one extractor of the project: the Python API, `flexpredict-zoo extract`, and the
feature pass of `flexpredict-train eval` and `flexpredict-train demo`.

    from flexpredict_zoo.features import extract_features, save_features
    result = extract_features("flexpredict_vit_b16", "photos/", patch_tokens=True, layers=[8, 11])
    result.names, result.pooled.shape          # ['a.jpg', 'sub/b.png'], (2, 768)
    save_features(result, "photos.safetensors")
    result = extract_features(model, dataset)  # a Dataset of (image, label) items: result.labels too

    # any number of images: a folder of shards, resumable, one store from several processes under torchrun
    store = extract_to_store("flexpredict_vit_b16", "imagenet/train/", "feats/", patch_tokens=True)
    store = open_features("feats/")               # later: memory-mapped, nothing read yet
    store.names, store.pooled[:10], store.patch_tokens.shape
    for batch in store.iter_batches(1024, keys=["pooled", "labels"], shuffle=True, seed=0): ...

Images read from paths are preprocessed with the model's evaluation transform (`eval_transform`, from the
model's pretrained config: for FlexPredict the official one, short side to the input size, centre crop). An
image that cannot be read is logged as `skipped unreadable image NAME: REASON` and recorded in
`result.skipped`; it is never dropped silently.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from .atomic_write import check_writable, write_file_atomically
from .checkpoints import save_safetensors
from .feature_store import (SHARD_TARGET_BYTES, FeatureStore, begin_store, finish_store, fingerprint_digest,
                            open_features, shard_file_name, state_dict_sha256, store_lock)
from .locks import claim_output

__all__ = ["FeatureResult", "extract_features", "extract_to_store", "open_features", "FeatureStore", "encode_batch",
           "save_features", "load_features", "find_images", "walk_images", "ImageFile",
           "eval_transform", "model_eval_transform", "model_data_config", "UnreadableImage", "read_image",
           "normalise_layers", "add_model_arguments", "model_arguments", "add_extract_arguments", "run_extract",
           "IMAGE_EXTENSIONS"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
# The image files of a folder, for extraction and for the training package's image folders.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMAT_VERSION = "2"  # 2: layer_{i} are final-normed block outputs (1: before the final norm); labels
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


@dataclass
class FeatureResult:
    """Features of the images that were read, one row per name, in the order of `names`.

    pooled: (N, D) float32, the model's pooled pre-logits output (for FlexPredict: final norm, mean over tokens).
    patch_tokens: (N, L, D) float32 final-normed patch tokens (prefix tokens removed), when requested.
    intermediates: {block index: (N, D)} for the requested `layers`: that block's output passed through the
        model's final norm, then averaged over the patch tokens. This is the paper's last-4-layers linear probe
        (and DINOv2's `get_intermediate_layers(norm=True)`): the last block's entry equals `pooled`. Block
        indices are 0-based and non-negative (-1 is stored as depth-1).
    intermediate_tokens: {block index: (N, L, D)} the final-normed token maps of the same blocks, when both
        `layers` and `patch_tokens` are requested.
    labels: (N,) int64 labels of the rows, when the input is a Dataset of (image, label) items.
    skipped: (name, reason) for every image that could not be read; these have no row.
    """
    names: List[str]
    pooled: torch.Tensor
    patch_tokens: Optional[torch.Tensor] = None
    intermediates: Optional[Dict[int, torch.Tensor]] = None
    intermediate_tokens: Optional[Dict[int, torch.Tensor]] = None
    labels: Optional[torch.Tensor] = None
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    model_name: Optional[str] = None
    input_size: Optional[Tuple[int, int, int]] = None
    dtype: Optional[str] = None
    metadata: Dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- inputs

class UnreadableImage(NamedTuple):
    """Stands in for an item whose image could not be read (a Dataset returns it instead of raising, so one bad
    file never kills a DataLoader worker); `error` says why."""
    path: str
    error: str


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


class ImageFile(NamedTuple):
    """A file found by `walk_images`: its path, its name for outputs, and, when it cannot be read, why (it is
    then reported as skipped with that reason, never left out)."""
    path: Path
    name: str
    problem: Optional[str] = None


def _link_problem(path: Path, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if path.is_symlink():
        return f"broken symbolic link to {os.readlink(path)}"
    return f"cannot open: {error.strerror or error}"


def walk_images(folder: PathLike, recursive: bool = True) -> List[ImageFile]:
    """Every file under `folder` that looks like an image (IMAGE_EXTENSIONS), sorted by its path relative to
    `folder` (its name), for extraction and training alike.

    Symbolic links to folders are followed, each real folder once (a link back to an ancestor, or a second link
    to the same folder, is not walked again); a broken link, a link loop, something that is not a regular file
    (a FIFO named .jpg) and a subfolder that cannot be listed are returned with their `problem`, so callers
    report them as skipped. `recursive=False`: the files directly in `folder` only; no subfolder is listed."""
    folder = Path(folder)
    found: List[ImageFile] = []
    visited = set()

    def relative(path: Union[str, Path]) -> str:
        return Path(path).relative_to(folder).as_posix()

    def unlisted(error: OSError) -> None:
        if Path(error.filename) == folder:
            raise PermissionError(f"cannot list the folder {str(folder)!r} ({error.strerror or error}); check its "
                                  f"permissions") from None
        found.append(ImageFile(Path(error.filename), relative(error.filename) + "/",
                               f"cannot list folder: {error.strerror or error}"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlisted, followlinks=True):
        info = os.stat(dirpath)
        if (info.st_dev, info.st_ino) in visited:  # reached again through a link: walked already
            dirnames[:] = []
            continue
        visited.add((info.st_dev, info.st_ino))
        if not recursive:  # os.walk descends into what is left in dirnames: nothing
            dirnames[:] = []
        dirnames.sort()  # a deterministic walk, so which of two links to a folder counts is deterministic too
        for filename in filenames:
            path = Path(dirpath) / filename
            if not _is_image_file(path):
                continue
            try:
                mode = os.stat(path).st_mode
            except OSError as error:
                found.append(ImageFile(path, relative(path), _link_problem(path, error)))
                continue
            problem = None if stat.S_ISREG(mode) else "not a regular file"
            found.append(ImageFile(path, relative(path), problem))
    return sorted(found, key=lambda f: f.name)


def find_images(inputs: Union[PathLike, Sequence[PathLike]]) -> List[ImageFile]:
    """ImageFile(path on disk, name, problem) for every image, in a deterministic order.

    A single folder: its image files (`walk_images`), named relative to the folder and sorted by that name.
    A list: in the order given; a file is taken whatever its extension and named as given; a folder expands
    to its sorted image files named `folder/relative/path`. A missing path or a folder without images is an error.
    """
    single = isinstance(inputs, (str, os.PathLike))
    items = [inputs] if single else list(inputs)
    if not items:
        raise ValueError("no input paths given: pass image files or folders of images")
    found: List[ImageFile] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files = walk_images(path)
            if not files:
                raise ValueError(f"no images found in folder {str(path)!r} (searched recursively for "
                                 f"{', '.join(IMAGE_EXTENSIONS)}); pass a folder that holds images")
            found.extend(f if single else f._replace(name=(Path(item) / f.name).as_posix()) for f in files)
        elif path.is_file():
            found.append(ImageFile(path, str(item)))
        else:
            raise FileNotFoundError(f"input path {str(item)!r} does not exist; pass image files or folders of images")
    return found


def _to_8_bit(image):
    """16-bit and float greyscale images as 8-bit "L" images, scaled (PIL's own conversion clips them: a 16-bit
    PNG turns almost white). 16-bit samples v become round(v / 257), so an 8-bit picture stored in 16 bits
    (v * 257) comes back exactly; floats must lie in [0, 1]."""
    import numpy as np
    from PIL import Image
    values = np.asarray(image)
    if image.mode == "F":
        low, high = float(values.min()), float(values.max())
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0.0 and high <= 1.0):
            raise ValueError(f"a floating-point image with values in [{low:g}, {high:g}]; only floats in [0, 1] are "
                             f"understood: save it as an 8- or 16-bit image")
        scaled = np.rint(values.astype(np.float64) * 255.0)
    else:  # "I;16*" (16-bit) or "I" (32-bit integers, as PIL opens some 16-bit files)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(f"a 32-bit integer image with values in [{low}, {high}], outside the 16-bit range; "
                             f"save it as an 8- or 16-bit image")
        scaled = np.rint(values.astype(np.float64) / 257.0)
    return Image.fromarray(scaled.astype(np.uint8), "L")


def read_image(source: Union[PathLike, Any]):
    """The image at `source` (a path or a binary file object) as an RGB PIL image, fully decoded (so a truncated
    file fails here, not later); 16-bit and float images are scaled to 8 bits (`_to_8_bit`), not clipped."""
    from PIL import Image
    with Image.open(source) as image:
        if image.mode == "F" or image.mode.startswith("I"):
            return _to_8_bit(image).convert("RGB")
        return image.convert("RGB")


class _ImagePaths(Dataset):
    """Items (image, -1) of image files, or UnreadableImage(name, reason)."""

    def __init__(self, files: Sequence[ImageFile]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path, name, problem = self.files[index]
        if problem is not None:
            return UnreadableImage(name, problem)
        try:
            return read_image(path), -1
        except Exception as error:  # any failure is recorded with its reason, never dropped silently
            return UnreadableImage(name, f"{type(error).__name__}: {error}")


class _Indexed(Dataset):
    """(index, item) with PIL images passed through the evaluation transform (in the loader's workers)."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if not isinstance(item, UnreadableImage) and not isinstance(item[0], torch.Tensor):
            try:
                item = (self.transform(item[0]), *item[1:])
            except Exception as error:
                item = UnreadableImage(str(index), f"{type(error).__name__}: {error}")
        return index, item


def _collate(batch):
    """(indices, images, labels) of the readable items, and (index, UnreadableImage) of the others."""
    good = [(i, item) for i, item in batch if not isinstance(item, UnreadableImage)]
    failed = [(i, item) for i, item in batch if isinstance(item, UnreadableImage)]
    if not good:
        return None, None, None, failed
    indices = torch.tensor([i for i, _ in good], dtype=torch.long)
    images = torch.stack([item[0] for _, item in good])
    labels = torch.as_tensor([int(item[1]) if len(item) > 1 else -1 for _, item in good], dtype=torch.long)
    return indices, images, labels, failed


def _item_names(dataset: Dataset) -> Callable[[int], str]:
    samples = getattr(dataset, "samples", None)  # ImageFolder-style datasets: (path, label) per item
    if isinstance(samples, Sequence) and len(samples) == len(dataset):  # type: ignore[arg-type]
        return lambda i: str(samples[i][0])
    return str


# ------------------------------------------------------------------------------------------------------ transform

def model_data_config(model: nn.Module) -> Dict[str, Any]:
    """The preprocessing `model` expects (timm's resolve_data_config of its pretrained cfg), with the input size
    of the model as built: a model built with img_size=S keeps the 224 pretrained cfg but only takes S."""
    from timm.data import resolve_data_config
    config = resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and not getattr(model, "dynamic_img_size", False):
        config["input_size"] = (config["input_size"][0], *tuple(img_size))
    return config


def eval_transform(img_size: Union[int, Tuple[int, int]], mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, interpolation: str = "bilinear", crop_pct: float = 1.0,
                   crop_mode: str = "center") -> Callable:
    """The evaluation preprocessing of PIL images: resize the short side to img_size / crop_pct, crop img_size
    (crop_mode), to tensor, normalise. FlexPredict's (the official evaluation): crop_pct 1.0, centre crop."""
    from timm.data import create_transform
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return create_transform(input_size=(3, *size), is_training=False, interpolation=interpolation, mean=tuple(mean),
                            std=tuple(std), crop_pct=crop_pct, crop_mode=crop_mode)


def model_eval_transform(model: nn.Module) -> Tuple[Callable, Tuple[int, int, int]]:
    """(eval_transform for `model`, its input size (C, H, W))."""
    config = model_data_config(model)
    transform = eval_transform(tuple(config["input_size"][1:]), config["mean"], config["std"],
                               config["interpolation"], config["crop_pct"], config.get("crop_mode") or "center")
    return transform, tuple(config["input_size"])


# ----------------------------------------------------------------------------------------------------------- model

def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if arch:
        return f"{arch}.{tag}" if tag else arch
    return type(model).__name__


def _resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif str(dtype).lower() in _DTYPES:
        resolved = _DTYPES[str(dtype).lower()]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    if resolved not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported dtype {resolved}; use one of bf16, fp16, fp32")
    return resolved


def normalise_layers(layers: Optional[Sequence[int]], model: nn.Module) -> Optional[List[int]]:
    """Block indices as non-negative ints (-1 is depth-1); out of range or repeated is a ValueError."""
    if layers is None:
        return None
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"{type(model).__name__} has no forward_intermediates; intermediate layers need a timm model")
    if isinstance(layers, int):
        layers = [layers]
    depth = len(model.blocks) if hasattr(model, "blocks") else None
    result = []
    for layer in layers:
        index = int(layer)
        if depth is not None:
            if not -depth <= index < depth:
                raise ValueError(f"layer {layer} is out of range: the model has {depth} blocks (0..{depth - 1}, "
                                 f"or negative from the end)")
            index %= depth
        result.append(index)
    if len(set(result)) != len(result):
        raise ValueError(f"layers {list(layers)} name the same block twice")
    return result


def _strip_prefix_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    prefix = getattr(model, "num_prefix_tokens", 0)  # class / register tokens of other timm ViTs
    return tokens[:, prefix:] if prefix else tokens


def encode_batch(model: nn.Module, images: torch.Tensor, patch_tokens: bool = False,
                 layers: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """One forward pass of a batch: {"pooled": (B, D)}, plus "tokens" (B, L, D) with `patch_tokens`, and with
    `layers` (non-negative block indices) "inter" {i: (B, D)} and, with `patch_tokens`, "inter_tokens"
    {i: (B, L, D)}: each block's output through the final norm (see FeatureResult). All float32 on the CPU."""
    out: Dict[str, Any] = {}
    if layers is not None:
        # norm=True: the final norm on every intermediate; timm returns them without prefix tokens.
        final, intermediates = model.forward_intermediates(images, indices=list(layers), norm=True, output_fmt="NLC")
        out["inter"] = {i: t.float().mean(dim=1).cpu() for i, t in zip(layers, intermediates)}
        if patch_tokens:
            out["inter_tokens"] = {i: t.float().cpu() for i, t in zip(layers, intermediates)}
    elif patch_tokens:
        final = model.forward_features(images)
    else:
        final = None
    if final is None:
        pooled = model.forward_head(model.forward_features(images), pre_logits=True) \
            if hasattr(model, "forward_head") else model(images)
    else:
        pooled = model.forward_head(final, pre_logits=True)
        if patch_tokens:
            out["tokens"] = _strip_prefix_tokens(model, final).float().cpu()
    out["pooled"] = pooled.float().cpu()
    return out


# ------------------------------------------------------------------------------------------------------ extraction

class _Encoder(NamedTuple):
    """A model ready for extraction, with what the rows depend on."""
    model: nn.Module
    name: str
    layers: Optional[List[int]]
    transform: Callable
    input_size: Tuple[int, int, int]
    weights_file_sha256: Optional[str]  # the released file's, where the manifest records it


def _check_run_options(batch_size: int, num_workers: int, device: Union[None, str, torch.device],
                       dtype: Union[None, str, torch.dtype]) -> Tuple[torch.device, torch.dtype]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use --device cpu")
    return device, _resolve_dtype(dtype, device)


def _open_inputs(inputs: Union[PathLike, Sequence[PathLike], Dataset]) -> Tuple[Dataset, Callable[[int], str], bool]:
    """(dataset of items, name of item i, whether items carry labels)."""
    if isinstance(inputs, Dataset):
        return inputs, _item_names(inputs), True
    files = find_images(inputs)
    return _ImagePaths(files), (lambda i: files[i][1]), False


def _load_model(model: Union[str, nn.Module], layers: Optional[Sequence[int]], patch_tokens: bool, pretrained: bool,
                model_kwargs: Optional[Mapping[str, Any]], weights: Optional[PathLike],
                encoder: Optional[str]) -> _Encoder:
    file_sha256 = None
    if isinstance(model, nn.Module):
        if model_kwargs or weights is not None or encoder is not None:
            raise ValueError("model_kwargs, weights and encoder only apply when the model is given by name or path")
        name = _model_name(model)
    else:
        from .encoders import resolve_encoder
        # Random weights are seeded: a rerun (resume) and every rank of a distributed run get the same ones.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            loaded = resolve_encoder(model, encoder, pretrained=pretrained, weights=weights, model_kwargs=model_kwargs)
        model, name = loaded.model, loaded.description
        if pretrained and weights is None:
            from . import manifest
            try:
                file_sha256 = manifest.weight_entry(name).sha256
            except (KeyError, manifest.UnknownModelError):
                file_sha256 = None  # not a released model name: the state dict's sha256 identifies the weights
    layer_indices = normalise_layers(layers, model)
    if (patch_tokens or layer_indices is not None) and not hasattr(model, "forward_features"):
        raise ValueError(f"{type(model).__name__} has no forward_features; patch tokens need a timm model")
    transform, input_size = model_eval_transform(model)
    return _Encoder(model, name, layer_indices, transform, input_size, file_sha256)


def _encoded_batches(encoder: _Encoder, dataset: Dataset, device: torch.device, autocast_dtype: torch.dtype,
                     patch_tokens: bool, num_workers: int, progress: bool, *, batch_size: Optional[int] = None,
                     batch_sampler: Optional[Sampler] = None, total: Optional[int] = None):
    """The one reading and forward loop: for every batch of the loader, (indices, labels, encode_batch output, or
    None when no image of the batch was readable, [(index, UnreadableImage)]), in the loader's order. Unreadable
    images are logged by name with their reason. The model runs in eval mode; its mode is restored after."""
    model = encoder.model
    was_training = model.training
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(_Indexed(dataset, encoder.transform), batch_size=batch_size if batch_sampler
                                         is None else 1, shuffle=False, batch_sampler=batch_sampler,
                                         num_workers=num_workers, collate_fn=_collate,
                                         pin_memory=device.type == "cuda")
    from tqdm import tqdm
    bar = tqdm(total=len(dataset) if total is None else total, unit="img",  # type: ignore[arg-type]
               desc=f"extract {encoder.name}", file=sys.stderr, disable=not progress)
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                    enabled=autocast_dtype != torch.float32):
            for indices, images, labels, failed in loader:
                for _, bad in failed:
                    message = f"skipped unreadable image {bad.path}: {bad.error}"
                    if progress:
                        bar.write(message, file=sys.stderr)
                    else:
                        logger.warning(message)
                out = None
                if images is not None:
                    out = encode_batch(model, images.to(device, non_blocking=True), patch_tokens, encoder.layers)
                yield indices, labels, out, failed
                bar.update((len(indices) if indices is not None else 0) + len(failed))
    finally:
        bar.close()
        model.train(was_training)


def extract_features(model: Union[str, nn.Module], inputs: Union[PathLike, Sequence[PathLike], Dataset], *,
                     batch_size: int = 64, device: Union[None, str, torch.device] = None, num_workers: int = 0,
                     patch_tokens: bool = False, layers: Optional[Sequence[int]] = None, pretrained: bool = True,
                     dtype: Union[None, str, torch.dtype] = None, progress: bool = False,
                     model_kwargs: Optional[Mapping[str, Any]] = None, weights: Optional[PathLike] = None,
                     encoder: Optional[str] = None) -> FeatureResult:
    """Features of images from an encoder, in memory (for small jobs; `extract_to_store` for any size).

    `inputs`: a folder, a file or a list of both (see `find_images`), or a Dataset of (image, label) items, the
    image a PIL image (given the evaluation transform here) or an already preprocessed tensor; an item may be an
    UnreadableImage, which is skipped and named. `model`: anything `flexpredict_zoo.encoders.load_encoder`
    takes (a model name, run folder, checkpoint, exported folder, `hf-hub:`, `local-dir:`; with `pretrained`,
    `weights`, `encoder`, `model_kwargs` passed on; random weights are seeded 0), or an nn.Module (timm-style:
    forward_features / forward_head; moved to `device`, run in eval mode, its train/eval mode restored
    afterwards). `device` defaults to CUDA when available. `dtype` is the autocast dtype: default bf16 on CUDA
    and fp32 (no autocast) on CPU; outputs are always float32. `layers`: block indices for
    `result.intermediates` (see FeatureResult). If no image can be read, ValueError.
    """
    device, autocast_dtype = _check_run_options(batch_size, num_workers, device, dtype)
    dataset, name_of, labelled = _open_inputs(inputs)  # before building the model: a bad path fails fast
    loaded = _load_model(model, layers, patch_tokens, pretrained, model_kwargs, weights, encoder)
    total = len(dataset)  # type: ignore[arg-type]
    skipped: Dict[int, Tuple[str, str]] = {}
    batches: List[Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]] = []
    for indices, labels, out, failed in _encoded_batches(loaded, dataset, device, autocast_dtype, patch_tokens,
                                                         num_workers, progress, batch_size=batch_size):
        skipped.update((index, (bad.path, bad.error)) for index, bad in failed)
        if out is not None:
            batches.append((indices, labels, out))

    skipped_list = [skipped[i] for i in sorted(skipped)]
    if not batches:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped_list[:5])
        raise ValueError(f"none of the {total} images could be read ({reasons}"
                         f"{'; ...' if len(skipped_list) > 5 else ''})")
    indices = torch.cat([i for i, _, _ in batches])
    # Rows follow the input order whatever order the loader delivered them in.
    order = torch.argsort(indices)
    layer_indices = loaded.layers

    def gather(get: Callable[[Dict[str, Any]], torch.Tensor]) -> torch.Tensor:
        return torch.cat([get(out) for _, _, out in batches])[order]

    return FeatureResult(
        names=[name_of(i) for i in indices[order].tolist()],
        pooled=gather(lambda out: out["pooled"]),
        patch_tokens=gather(lambda out: out["tokens"]) if patch_tokens else None,
        intermediates=({layer: gather(lambda out: out["inter"][layer]) for layer in layer_indices}
                       if layer_indices is not None else None),
        intermediate_tokens=({layer: gather(lambda out: out["inter_tokens"][layer]) for layer in layer_indices}
                             if layer_indices is not None and patch_tokens else None),
        labels=torch.cat([labels for _, labels, _ in batches])[order] if labelled else None,
        skipped=skipped_list, model_name=loaded.name, input_size=loaded.input_size,
        dtype=str(autocast_dtype).replace("torch.", ""))


# ------------------------------------------------------------------------------------------- store (any size)

def _row_keys(patch_tokens: bool,
              layers: Optional[Sequence[int]]) -> Dict[str, Callable[[Dict[str, Any]], torch.Tensor]]:
    """The arrays of a row (the names `save_features` gives them) and where encode_batch's output holds them."""
    keys: Dict[str, Callable[[Dict[str, Any]], torch.Tensor]] = {"pooled": lambda out: out["pooled"]}
    if patch_tokens:
        keys["patch_tokens"] = lambda out: out["tokens"]
    for layer in layers or []:
        keys[f"layer_{layer}"] = lambda out, layer=layer: out["inter"][layer]
    for layer in (layers or []) if patch_tokens else []:
        keys[f"layer_{layer}_tokens"] = lambda out, layer=layer: out["inter_tokens"][layer]
    return keys


def _row_shapes(loaded: _Encoder, device: torch.device, autocast_dtype: torch.dtype,
                patch_tokens: bool) -> Dict[str, Tuple[int, ...]]:
    """The per-row shape of every array, from one forward of a blank image (this also proves the model runs)."""
    model = loaded.model
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                    enabled=autocast_dtype != torch.float32):
            out = encode_batch(model, torch.zeros(1, *loaded.input_size, device=device), patch_tokens, loaded.layers)
    finally:
        model.train(was_training)
    return {key: tuple(get(out).shape[1:]) for key, get in _row_keys(patch_tokens, loaded.layers).items()}


class _ShardBatches(Sampler):
    """Batches of input indices that never cross a shard: shard by shard, `batch_size` at a time from its first
    input, so a shard's batches are the same whichever run or rank computes it (and its rows identical)."""

    def __init__(self, shards: Sequence[Tuple[int, int, int]], batch_size: int):
        self.plan = [(shard, start, min(start + batch_size, stop), start + batch_size >= stop)
                     for shard, first, stop in shards for start in range(first, stop, batch_size)]

    def __iter__(self):
        return (list(range(start, stop)) for _, start, stop, _ in self.plan)

    def __len__(self) -> int:
        return len(self.plan)


def _distributed_context(device: torch.device) -> Tuple[int, int, bool, torch.device]:
    """(rank, world size, whether this call created the process group, device of this rank). Joins torchrun's
    group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA); uses the caller's group if one exists."""
    import torch.distributed as dist
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False, device
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False, device
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch several processes with "
                         f"torchrun (torchrun --nproc_per_node=K -m flexpredict_zoo.cli extract ...)")
    import datetime
    # Ranks wait for each other only at the start and the end; a long extraction must not time the wait out.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), dist.get_world_size(), True, device


def _inputs_fingerprint(name_of: Callable[[int], str], total: int) -> Dict[str, Any]:
    digest = hashlib.sha256()
    for i in range(total):
        digest.update(name_of(i).encode())
        digest.update(b"\n")
    return {"count": total, "names_sha256": digest.hexdigest()}


def _default_shard_size(shapes: Mapping[str, Tuple[int, ...]], labelled: bool, batch_size: int) -> int:
    row_bytes = sum(4 * math.prod(shape) for shape in shapes.values()) + (8 if labelled else 0)
    rows = max(1, SHARD_TARGET_BYTES // row_bytes)
    return rows // batch_size * batch_size if rows >= batch_size else rows  # whole batches where it fits


def extract_to_store(model: Union[str, nn.Module], inputs: Union[PathLike, Sequence[PathLike], Dataset],
                     out_dir: PathLike, *, layers: Optional[Sequence[int]] = None, patch_tokens: bool = False,
                     batch_size: int = 64, shard_size: Optional[int] = None,
                     device: Union[None, str, torch.device] = None, dtype: Union[None, str, torch.dtype] = None,
                     num_workers: int = 0, progress: bool = False, fingerprint: Optional[Mapping[str, Any]] = None,
                     pretrained: bool = True, model_kwargs: Optional[Mapping[str, Any]] = None,
                     weights: Optional[PathLike] = None, encoder: Optional[str] = None, overwrite: bool = False,
                     report: Optional[Callable[[str], None]] = None) -> FeatureStore:
    """Make, continue or reuse the feature store `out_dir` (see `flexpredict_zoo.feature_store`) and open it.

    Contract:
    - The store's rows equal `extract_features(model, inputs, ...)`'s (same names, skips and values), written as
      shards of `shard_size` inputs (default: about SHARD_TARGET_BYTES of rows, whole batches) and held in memory
      one shard at a time, so memory does not grow with the number of images.
    - The store's fingerprint is the model's name, the sha256 of its state dict, the options the rows depend on
      (patch_tokens, layers, autocast dtype, preprocessing, shard size), the inputs (count and the sha256 of
      their names in order) and the caller's `fingerprint` items (e.g. a dataset's name and split: a Dataset is
      known to the store only by its length and item names). An existing store with the same fingerprint is
      continued after its last complete shard, or, if complete, reused without any extraction; one with
      another fingerprint is never touched: ValueError listing the differences (`overwrite=True` deletes it and
      starts again). `batch_size`, `num_workers` and `device` are not part of it.
    - Everything checked before the work: options, inputs found, `out_dir` writable, model loaded and run once.
    - Under torchrun (WORLD_SIZE > 1; or inside a caller's process group) every rank calls this with the same
      arguments: the missing shards are dealt out round robin, each rank writes its own, rank 0 writes the
      index after all are done, and every rank returns the opened store. `out_dir` must be one folder that all
      ranks see (a shared file system across nodes).
    - Stopped at any point, the same call continues the store; a shard file is complete or absent.
    `report`: called with one-line messages for the user (resuming, already complete, written); default: logging.
    Returns the opened store (`open_features(out_dir)`). If no image at all could be read, ValueError.
    """
    import torch.distributed as dist
    say = report or logger.info
    device, autocast_dtype = _check_run_options(batch_size, num_workers, device, dtype)
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    out_dir = Path(out_dir)
    rank, world, created_group, device = _distributed_context(device)
    lock = contextlib.ExitStack()
    try:
        dataset, name_of, labelled = _open_inputs(inputs)
        total = len(dataset)  # type: ignore[arg-type]
        if total == 0:
            raise ValueError("the dataset is empty: there are no images to extract")
        check_writable(out_dir)
        loaded = _load_model(model, layers, patch_tokens, pretrained, model_kwargs, weights, encoder)
        shapes = _row_shapes(loaded, device, autocast_dtype, patch_tokens)
        config = model_data_config(loaded.model)
        store_fingerprint = {
            "model": loaded.name, "weights_sha256": state_dict_sha256(loaded.model),
            "options": {"patch_tokens": patch_tokens, "layers": loaded.layers, "dtype": _dtype_name(autocast_dtype),
                        "preprocessing": {key: (list(value) if isinstance(value, tuple) else value)
                                          for key, value in sorted(config.items())}},
            "inputs": _inputs_fingerprint(name_of, total), "labels": labelled,
            "caller": {str(k): v for k, v in (fingerprint or {}).items()}, "format_version": FORMAT_VERSION}
        arrays = {key: {"shape": list(shape), "dtype": "float32"} for key, shape in shapes.items()}
        if labelled:
            arrays["labels"] = {"shape": [], "dtype": "int64"}
        record = {"model": loaded.name, "weights_sha256": store_fingerprint["weights_sha256"],
                  "weights_file_sha256": loaded.weights_file_sha256, "image_size": list(loaded.input_size),
                  "dtype": _dtype_name(autocast_dtype), "layers": loaded.layers or [], "versions": _versions(),
                  "run": {"batch_size": batch_size, "num_workers": num_workers, "device": device.type,
                          "world_size": world}}

        # Rank 0 checks the folder and decides what is left; the others learn it (or the error) from it.
        plan, error = None, None
        if rank == 0:
            try:
                lock.enter_context(store_lock(out_dir))  # held by rank 0 until the store is done
                plan = begin_store(out_dir, store_fingerprint, record, total, shard_size,
                                   _default_shard_size(shapes, labelled, batch_size), arrays, overwrite)
            except (ValueError, OSError) as caught:
                error = caught
        if world > 1:
            message = [plan, None if error is None else f"{type(error).__name__}: {error}",
                       fingerprint_digest(store_fingerprint)]
            dist.broadcast_object_list(message, src=0)
            plan, remote_error, rank0_digest = message
            if rank != 0 and remote_error is not None:
                raise ValueError(f"rank 0 could not start the store: {remote_error}")
            if error is None and rank0_digest != fingerprint_digest(store_fingerprint):
                raise ValueError(f"rank {rank} loaded another model, weights or inputs than rank 0 (fingerprints "
                                 f"differ); every rank must run the same command over the same files")
        if error is not None:
            raise error
        assert plan is not None
        size, digest = plan.index["shard_size"], fingerprint_digest(plan.index["fingerprint"])
        if plan.state == "complete":
            if rank == 0:
                say(f"{out_dir} is already complete ({plan.index['rows']} rows in {plan.index['num_shards']} "
                    f"shards); nothing to do")
        else:
            if rank == 0 and plan.state == "resumed":
                done = plan.index["num_shards"] - len(plan.pending)
                say(f"resuming {out_dir}: {done} of {plan.index['num_shards']} shards already complete")
            _write_shards(loaded, dataset, name_of, labelled, plan.pending[rank::world], shapes, out_dir, size,
                          digest, device, autocast_dtype, patch_tokens, batch_size, num_workers,
                          progress and rank == 0, rank)
            if world > 1:
                dist.barrier()
            if rank == 0:
                final = finish_store(out_dir, plan.index)
                say(f"wrote {out_dir}: {final['rows']} rows in {final['num_shards']} shards, "
                    f"{len(final['skipped'])} images skipped")
            if world > 1:
                dist.barrier()
        store = open_features(out_dir)
        if len(store) == 0:
            reasons = "; ".join(f"{p}: {r}" for p, r in store.skipped[:5])
            raise ValueError(f"none of the {total} images could be read ({reasons}"
                             f"{'; ...' if len(store.skipped) > 5 else ''})")
        return store
    finally:
        lock.close()
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _write_shards(loaded: _Encoder, dataset: Dataset, name_of: Callable[[int], str], labelled: bool,
                  shards: Sequence[Tuple[int, int, int]], shapes: Mapping[str, Tuple[int, ...]], out_dir: Path,
                  shard_size: int, digest: str, device: torch.device, autocast_dtype: torch.dtype,
                  patch_tokens: bool, batch_size: int, num_workers: int, progress: bool, rank: int) -> None:
    """Extract `shards` [(shard, first input, stop input)] and write each as soon as its last batch is done. One
    buffer of `shard_size` rows per array, reused from shard to shard: the only rows ever held."""
    if not shards:
        return
    rows = min(shard_size, max(stop - first for _, first, stop in shards))
    buffers = {key: torch.empty((rows, *shape), dtype=torch.float32) for key, shape in shapes.items()}
    if labelled:
        buffers["labels"] = torch.empty(rows, dtype=torch.int64)
    getters = _row_keys(patch_tokens, loaded.layers)
    sampler = _ShardBatches(shards, batch_size)
    names: List[str] = []
    skipped: List[Tuple[str, str]] = []
    batches = _encoded_batches(loaded, dataset, device, autocast_dtype, patch_tokens, num_workers, progress,
                               batch_sampler=sampler, total=sum(stop - first for _, first, stop in shards))
    bounds = {shard: (first, stop) for shard, first, stop in shards}
    for step, (indices, labels, out, failed) in enumerate(batches):
        shard, _, _, last = sampler.plan[step]  # the loader delivers the sampler's batches in order
        skipped.extend((bad.path, bad.error) for _, bad in failed)
        if out is not None:
            # The loader keeps the sampler's order, so rows arrive in input order: append them.
            n, count = len(names), len(indices)
            for key, get in getters.items():
                buffers[key][n:n + count] = get(out)
            if labelled:
                buffers["labels"][n:n + count] = labels
            names.extend(name_of(i) for i in indices.tolist())
        if last:
            n = len(names)
            first, stop = bounds[shard]
            result = FeatureResult(
                names=names, pooled=buffers["pooled"][:n],
                patch_tokens=buffers["patch_tokens"][:n] if patch_tokens else None,
                intermediates={i: buffers[f"layer_{i}"][:n] for i in loaded.layers} if loaded.layers else None,
                intermediate_tokens=({i: buffers[f"layer_{i}_tokens"][:n] for i in loaded.layers}
                                     if loaded.layers and patch_tokens else None),
                labels=buffers["labels"][:n] if labelled else None, skipped=skipped, model_name=loaded.name,
                input_size=loaded.input_size, dtype=_dtype_name(autocast_dtype))
            save_features(result, out_dir / shard_file_name(shard),
                          {"store_fingerprint": digest, "shard": shard, "first_input": first, "stop_input": stop,
                           "rank": rank})
            names, skipped = [], []


# ------------------------------------------------------------------------------------------------------- file i/o

def _versions() -> Dict[str, str]:
    import timm
    from . import __version__
    return {"torch_version": torch.__version__, "timm_version": timm.__version__, "flexpredict_zoo_version": __version__}


def save_features(result: FeatureResult, path: PathLike, metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write `result` to a .safetensors file atomically (a temporary file in the same folder, then a rename).

    Tensors: `pooled` (N, D); `patch_tokens` (N, L, D) if present; `layer_{i}` (N, D) and `layer_{i}_tokens`
    (N, L, D) per intermediate block; `labels` (N,) int64 if present. Metadata (all JSON strings): `names`, `skipped` (list of {path, reason}),
    `model`, `image_size` ([C, H, W]), `dtype`, `layers`, version strings, plus `metadata` (values that are not
    strings are JSON-encoded). The parent folder is created; an existing file is replaced.
    """
    path = Path(path)
    tensors = {"pooled": result.pooled}
    if result.patch_tokens is not None:
        tensors["patch_tokens"] = result.patch_tokens
    for layer, value in (result.intermediates or {}).items():
        tensors[f"layer_{layer}"] = value
    for layer, value in (result.intermediate_tokens or {}).items():
        tensors[f"layer_{layer}_tokens"] = value
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    if result.labels is not None:
        tensors["labels"] = result.labels.detach().to("cpu", torch.int64).contiguous()
    header = dict(result.metadata)
    header.update({
        "format": "flexpredict_zoo.features", "format_version": FORMAT_VERSION,
        "names": json.dumps(result.names), "skipped": json.dumps([{"path": p, "reason": r} for p, r in result.skipped]),
        "model": result.model_name or "", "image_size": json.dumps(list(result.input_size or [])),
        "dtype": result.dtype or "", "layers": json.dumps(sorted(result.intermediates or {})), **_versions()})
    for key, value in (metadata or {}).items():
        header[str(key)] = value if isinstance(value, str) else json.dumps(value)
    # save_safetensors: the same features give the same bytes (safetensors alone orders the metadata at random)
    return write_file_atomically(path, lambda temp: save_safetensors(tensors, temp, header))


def load_features(path: PathLike) -> FeatureResult:
    """Read a file written by `save_features` back into a FeatureResult (metadata in `result.metadata`)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); write it with save_features "
                         f"or `flexpredict-zoo extract`") from None
    if meta.get("format") != "flexpredict_zoo.features" or "pooled" not in tensors:
        raise ValueError(f"{path} is a safetensors file but not a feature file written by flexpredict_zoo "
                         f"(no 'format' metadata or no 'pooled' tensor)")
    layers = json.loads(meta.get("layers", "[]"))
    return FeatureResult(
        names=json.loads(meta["names"]), pooled=tensors["pooled"], patch_tokens=tensors.get("patch_tokens"),
        intermediates={i: tensors[f"layer_{i}"] for i in layers} if layers else None,
        intermediate_tokens=({i: tensors[f"layer_{i}_tokens"] for i in layers}
                             if layers and f"layer_{layers[0]}_tokens" in tensors else None),
        labels=tensors.get("labels"),
        skipped=[(item["path"], item["reason"]) for item in json.loads(meta.get("skipped", "[]"))],
        model_name=meta.get("model") or None,
        input_size=tuple(json.loads(meta["image_size"])) if meta.get("image_size") not in (None, "[]") else None,
        dtype=meta.get("dtype") or None, metadata=meta)


# ------------------------------------------------------------------------------------------------------------ CLI

def add_model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of every command that runs a model over images (`extract`, `show`): MODEL PATH...,
    --checkpoint, --no-pretrained, --encoder, --device. `model_arguments` reads them."""
    parser.add_argument("model", metavar="MODEL",
                        help="model name (e.g. flexpredict_vit_b16; any timm name, ViT-like for show), training run "
                             "folder, checkpoint file, exported folder, hf-hub:ORG/NAME or local-dir:DIR")
    parser.add_argument("paths", metavar="PATH", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--checkpoint", default=None, metavar="FILE",
                        help="weights for the model name MODEL (official checkpoint, safetensors or converted folder)")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="random weights, seeded 0 (for testing a pipeline)")
    parser.add_argument("--encoder", choices=["target", "context"], default=None,
                        help="for checkpoints holding both: the EMA target encoder (default, as the paper) or the "
                             "context one")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: cuda if available; extract "
                                                       "under torchrun: cuda:LOCAL_RANK)")
    return parser


def model_arguments(args: argparse.Namespace) -> Tuple[Union[str, List[str]], Dict[str, Any]]:
    """(inputs, model options) from the `add_model_arguments` arguments: the inputs as `find_images` takes them
    (one path: names relative to it, as in the API; several: names as given) and the keyword arguments
    `pretrained`, `weights`, `encoder`, `device` of `extract_features` and `show`."""
    if args.checkpoint and args.no_pretrained:
        raise ValueError("--checkpoint and --no-pretrained contradict each other; pass one of them")
    inputs = args.paths[0] if len(args.paths) == 1 else args.paths
    return inputs, dict(pretrained=not args.no_pretrained, weights=args.checkpoint, encoder=args.encoder,
                        device=args.device)


def add_extract_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `flexpredict-zoo extract MODEL PATH... --out DIR | FILE.safetensors`."""
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR|FILE.safetensors",
                        help="a folder: a feature store of shards (any size; resumable: run the same command again "
                             "to continue; several processes under torchrun); FILE.safetensors: one file, in memory")
    parser.add_argument("--shard-size", type=int, default=None, metavar="N",
                        help="images per shard of a store (default: a store's own, or about 256 MB of rows)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out: the file, or the store's index and shards (and nothing else)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader worker processes (default: min(8, CPU count))")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--patch-tokens", action="store_true", help="also store the (N, L, D) patch tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=None, metavar="I",
                        help="also store these blocks' outputs, final-normed and mean-pooled (0-based, negative "
                             "from the end; the paper's last-4 probe is --layers -4 -3 -2 -1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _shapes_text(shapes: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {'x'.join(str(s) for s in shape)}" for key, shape in shapes.items())


def run_extract(args: argparse.Namespace) -> int:
    out = Path(args.out)
    inputs, model_options = model_arguments(args)
    options = dict(batch_size=args.batch_size, num_workers=args.workers, patch_tokens=args.patch_tokens,
                   layers=args.layers, dtype=args.dtype, progress=not args.no_progress, **model_options)
    if out.suffix != ".safetensors":
        return _run_extract_to_store(args, out, inputs, options)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"--out {out} is a single file, written by one process; under torchrun pass a folder "
                         f"(--out DIR) to write a feature store")
    if args.shard_size is not None:
        raise ValueError(f"--shard-size applies to a feature store; --out {out} is a single file (pass a folder)")
    find_images(inputs)  # the inputs and the output folder are checked before the model is loaded
    check_writable(out.parent)
    # one process per output: a second extraction to the same file is refused, naming this one, instead of
    # replacing its result at the end
    with claim_output(out, "extraction", args.overwrite):
        result = extract_features(args.model, inputs, **options)
        extra = {"weights": str(args.checkpoint) if args.checkpoint else ("none" if args.no_pretrained else "pretrained")}
        save_features(result, out, extra)
    shape = "x".join(str(s) for s in result.pooled.shape)
    print(f"read {len(result.names)} images, skipped {len(result.skipped)}; wrote {out}: pooled {shape}"
          + (f", patch_tokens {'x'.join(map(str, result.patch_tokens.shape))}" if result.patch_tokens is not None else "")
          + (f", layers {sorted(result.intermediates)}" if result.intermediates else ""))
    for name, reason in result.skipped:
        print(f"  skipped {name}: {reason}")
    return 0


def _run_extract_to_store(args: argparse.Namespace, out: Path, inputs: Any, options: Dict[str, Any]) -> int:
    rank = int(os.environ.get("RANK", "0"))
    print_rank0 = (lambda text: print(text, flush=True)) if rank == 0 else (lambda text: None)
    try:
        store = extract_to_store(args.model, inputs, out, shard_size=args.shard_size, overwrite=args.overwrite,
                                 report=print_rank0, **options)
    except KeyboardInterrupt:
        if rank == 0:
            print(f"interrupted: the complete shards in {out} are kept; run the same command again to continue",
                  file=sys.stderr)
        raise
    if rank == 0:
        shapes = {key: store[key].shape for key in store.keys}
        print(f"read {len(store)} images, skipped {len(store.skipped)}; {out}: {_shapes_text(shapes)}")
        for name, reason in store.skipped:
            print(f"  skipped {name}: {reason}")
    return 0
